"""Llama: the decoder of Llama 2/3, Qwen2/2.5 and Mistral in one file (Touvron et al., 2023).

Pre-RMSNorm blocks, rotary position embeddings (RoPE, Su et al. 2021) with optional
`llama3` or `linear` frequency scaling, a SwiGLU MLP, grouped-query attention
(fewer key/value heads than query heads; one is multi-query), optional q/k/v
biases (Qwen2), optional sliding-window attention (Mistral), tied or untied input
and output embeddings. No biases elsewhere.

Parameter names follow Hugging Face's LlamaForCausalLM
(`model.layers.0.self_attn.q_proj.weight`, ...), so import and export are the
identity on names (models/hf.py). The KV cache holds n_kv_head heads per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.decoding import DecoderLM, KVCache, SlotCache, SlotView, attend, packed, slot_mask

ROPE_SCALING_TYPES = ("llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's `rope_scaling`: `linear` divides every frequency by `factor`; `llama3` (Llama
    3.1) divides the low frequencies by `factor`, keeps the high ones and blends between them."""
    type: str
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only: the context length pretraining used

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type: must be one of {', '.join(ROPE_SCALING_TYPES)}, not {self.type!r}")
        if self.factor <= 0:
            raise ValueError("rope_scaling.factor: must be positive")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor > 0")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest sequence (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # a divisor of n_head: fewer is grouped-query attention, 1 is multi-query
    n_embd: int = 256
    intermediate_size: int = 688  # the SwiGLU width: about 8/3 n_embd
    head_dim: int = 0  # 0: n_embd // n_head
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: a token attends to at most this many positions
    dropout: float = 0.0  # attention dropout

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: must divide n_head ({self.n_head}), not {self.n_kv_head}")
        if not self.head_dim:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_head: must divide n_embd ({self.n_embd}) unless head_dim is set")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head size, not {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError("sliding_window: must be positive (or null for full attention)")
        if isinstance(self.rope_scaling, dict):  # from a YAML or JSON config
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim / 2,), scaled as the config says (fp32)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.type == "linear":
        return inv / s.factor
    low_wavelen = s.original_max_position / s.low_freq_factor  # longer waves: divided by factor
    high_wavelen = s.original_max_position / s.high_freq_factor  # shorter waves: kept
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (..., T, hs) with cos, sin broadcastable to it; the halves pair up as in Hugging Face."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) in fp32, back to x's dtype, then the weight (Hugging Face's order).
        torch's one rms_norm op instead of five: at batch 1 a decode step is mostly such small ops."""
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout, self.window = cfg.dropout, cfg.sliding_window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | SlotView | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # positions go in before k is cached
        y, present = attend(q, k, v, past, self.dropout if self.training else 0.0, self.window)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)), present


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(DecoderLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.model.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # cos, sin of every position (block_size, hs), fp32; not weights, so not in the state dict
        angles = torch.outer(torch.arange(cfg.block_size).float(), rope_frequencies(cfg))  # (T, hs / 2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[pos].to(dtype), self.rope_sin[pos].to(dtype)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
               segments: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) -> final-norm hidden states (B, T, C) and the KV cache (task heads read these);
        `segments` (B, T): packed rows (models.decoding.packed), no cache."""
        T, t_past = idx.size(1), self.past_length(idx, cache)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if segments is not None:
            view, pos = packed(segments, window=self.cfg.sliding_window)  # pos (B, T): inside each example
            cos, sin = (t[:, None] for t in self._rope(pos, x.dtype))  # (B, 1, T, hs) against (B, h, T, hs)
        else:
            view = None
            cos, sin = self._rope(torch.arange(t_past, t_past + T, device=idx.device), x.dtype)  # (T, hs)
        presents: KVCache = []
        for i, block in enumerate(self.model.layers):
            x, present = block(x, cos, sin, view or (cache[i] if cache else None))
            presents.append(present)
        return self.model.norm(x), presents

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def decode(self, idx: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """T new tokens for each of the cache's live rows: idx (n, T) -> logits (n, T, vocab), row i's
        tokens at positions lengths[i].. (iteration-level batching, as GPT.decode). T > 1 verifies
        draft tokens in one pass (speculative decoding). Every row's length grows by T."""
        (n, T), pos = idx.shape, self.slot_positions(idx, cache)
        mask = slot_mask(pos, T, self.cfg.sliding_window)  # (n, 1, T, W)
        x = self.model.embed_tokens(idx)  # (n, T, C)
        cos, sin = self._rope(pos[:, None] + torch.arange(T, device=idx.device), x.dtype)  # (n, T, hs)
        cos, sin = cos[:, None], sin[:, None]  # (n, 1, T, hs) against q, k (n, h, T, hs)
        for i, block in enumerate(self.model.layers):
            x, _ = block(x, cos, sin, SlotView(cache.k[i, :n], cache.v[i, :n], pos, mask))
        cache.lengths[:n] += T
        return self.lm_head(self.model.norm(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; `non_embedding` leaves out the input embedding table unless the head shares it."""
        n = sum(p.numel() for p in self.parameters())
        untied = not self.cfg.tie_embeddings
        return n - self.model.embed_tokens.weight.numel() if non_embedding and untied else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N (the lookup table aside, the head's matmul in) plus attention
        12*L*(n_head*hs)*T (PaLM, Chowdhery et al. 2022, app. B)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_head * self.cfg.head_dim * T
