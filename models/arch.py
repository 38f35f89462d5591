"""Which architectures Helio trains, and how a config becomes a model.

A job names an architecture and its sizes; the vocabulary and sequence length
come from the dataset artifact, so they are arguments here, not config keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.nn as nn

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig

ARCHS = ("gpt", "llama", "encoder")
CAUSAL = ("gpt", "llama")  # next-token pretraining; the encoder is a masked LM
LLAMA_ONLY = {"n_kv_head": 0, "intermediate_size": 0, "rope_theta": 10000.0, "tie_embeddings": False}  # defaults


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"  # gpt: causal LM (GPT-2); llama: causal LM (Llama 3 / Qwen2 / Mistral); encoder: masked LM (BERT)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    # llama only
    n_kv_head: int = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0: n_head
    intermediate_size: int = 0  # the SwiGLU width; 0: 8/3 n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

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
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head: must divide n_head ({self.n_head}), not {self.n_kv_head}")
        if self.intermediate_size < 0 or self.rope_theta <= 0:
            raise ValueError("intermediate_size and rope_theta: must be positive (intermediate_size 0: the default)")
        if self.arch != "llama" and (set_ := [k for k, v in LLAMA_ONLY.items() if getattr(self, k) != v]):
            raise ValueError(f"{set_[0]}: only arch llama has it, not {self.arch}")

    def identity(self) -> dict:
        """What a checkpoint of this model must agree on: every field, but the llama-only ones (always
        their defaults) only for a llama, so that runs checkpointed before they existed still resume."""
        out = dataclasses.asdict(self)
        return out if self.arch == "llama" else {k: v for k, v in out.items() if k not in LLAMA_ONLY}


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_id: int = 1) -> nn.Module:
    """A freshly initialised GPT, Llama or Encoder that reads sequences of up to `seq_len` tokens."""
    if cfg.arch == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout))
    if cfg.arch == "llama":
        width = cfg.intermediate_size or math.ceil(8 * cfg.n_embd / 3 / 32) * 32
        return Llama(LlamaConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                 n_kv_head=cfg.n_kv_head or cfg.n_head, n_embd=cfg.n_embd, intermediate_size=width,
                                 rope_theta=cfg.rope_theta, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout))
    return Encoder(EncoderConfig(vocab_size=vocab_size, max_position=seq_len, n_layer=cfg.n_layer,
                                 n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                                 pad_id=pad_id))
