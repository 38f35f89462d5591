"""GPT: the GPT-2 architecture in one file (Radford et al., 2019).

Learned positions, pre-LayerNorm blocks, GELU (tanh approximation), tied input
and output embeddings, biases everywhere; attention through
F.scaled_dot_product_attention. Parameter names follow Hugging Face's
GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight`, ...) so that export is a
transpose of the Conv1D weights and nothing else (models/hf.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.decoding import DecoderLM, KVCache, SlotCache, SlotView, attend, packed, slot_mask


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest sequence (positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: must divide n_embd ({self.n_embd})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")

    @property
    def n_kv_head(self) -> int:  # what a SlotCache is sized by: GPT-2 has a key and value per head
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | SlotView | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y, present = attend(q, k, v, past, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), present


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(DecoderLM):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf, 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
               segments: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) -> final-layer-norm hidden states (B, T, C) and the KV cache (task heads read these);
        `segments` (B, T): packed rows (models.decoding.packed), no cache."""
        T, t_past = idx.size(1), self.past_length(idx, cache)
        view, pos = (packed(segments) if segments is not None
                     else (None, torch.arange(t_past, t_past + T, device=idx.device)))  # pos (B, T) or (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, view or (cache[i] if cache else None))
            presents.append(present)
        return self.transformer.ln_f(x), presents

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f

    def decode(self, idx: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """T new tokens for each of the cache's live rows: idx (n, T) -> logits (n, T, vocab).

        Every row sits at its own position and attends to its own past only,
        so sequences of any lengths, admitted at any step, decode together
        (iteration-level batching). T > 1 verifies draft tokens in one pass
        (speculative decoding). Every row's length grows by T.
        """
        (n, T), pos = idx.shape, self.slot_positions(idx, cache)
        mask = slot_mask(pos, T)  # (n, 1, T, W)
        at = pos[:, None] + torch.arange(T, device=idx.device)  # (n, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(at)  # (n, T, C)
        for i, block in enumerate(self.transformer.h):
            x, _ = block(x, SlotView(cache.k[i, :n], cache.v[i, :n], pos, mask))
        cache.lengths[:n] += T
        return self.lm_head(self.transformer.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N plus attention 12*L*C*T (PaLM, Chowdhery et al. 2022, app. B)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_embd * T
