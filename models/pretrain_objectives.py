"""Pretraining objectives (causal LM, masked LM): how a packed block of token ids becomes a loss.

The finetuning tasks' objectives are in models/task_heads.py.

Each objective wraps a model as an nn.Module whose forward returns the loss, so
a data-parallel engine (DeepSpeed, DDP) that calls `forward` computes the
objective. `batch` turns a dict of columns, `input_ids` a block (B, L), into the
forward's arguments.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.arch import CAUSAL
from models.masking import mask_tokens


class CausalLM(nn.Module):
    """Next-token prediction (GPT): inputs are a block's first L-1 tokens, targets its last L-1."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        block = rows["input_ids"]  # (B, L)
        return block[:, :-1], block[:, 1:]  # (B, T), (B, T)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, targets)


class MaskedLM(nn.Module):
    """Masked-token prediction (BERT): 15% of tokens chosen, 80/10/10 mask/random/keep."""

    def __init__(self, model: nn.Module, mask_id: int, special_ids: Sequence[int], mask_prob: float = 0.15):
        super().__init__()
        self.model = model
        self.mask_id, self.special_ids, self.mask_prob = mask_id, tuple(special_ids), mask_prob

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        return mask_tokens(rows["input_ids"][:, :-1], self.model.cfg.vocab_size, self.mask_id, self.special_ids,
                           self.mask_prob, generator)  # inputs (B, T), labels (B, T)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, labels)


def objective_for(model: nn.Module, arch: str, mask_id: int, special_ids: Sequence[int],
                  mask_prob: float = 0.15) -> nn.Module:
    return CausalLM(model) if arch in CAUSAL else MaskedLM(model, mask_id, special_ids, mask_prob)
