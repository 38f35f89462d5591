"""Which architectures Helio trains, and how a config becomes a model.

A job names an architecture and its sizes; the vocabulary and sequence length
come from the dataset artifact, so they are arguments here, not config keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig

ARCHS = ("gpt", "encoder")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"  # gpt: causal LM (GPT-2); encoder: masked LM (BERT)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: must divide n_embd ({self.n_embd})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 1) -> nn.Module:
    """A freshly initialised GPT or Encoder that reads sequences of up to `seq_len` tokens."""
    if cfg.arch == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout))
    return Encoder(EncoderConfig(vocab_size=vocab_size, max_position=seq_len, n_layer=cfg.n_layer,
                                 n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                                 pad_id=pad_id))
