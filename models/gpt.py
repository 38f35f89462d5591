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
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v of shape (B, nh, T_past, hs)


class SlotView(NamedTuple):
    """One layer's view of a SlotCache for a decode step: each row's new k, v go in at its own position."""
    k: torch.Tensor  # (n, nh, block_size, hs), written in place
    v: torch.Tensor
    pos: torch.Tensor  # (n,) where each row's new token sits
    mask: torch.Tensor  # (n, 1, 1, T): key j is visible to row i iff j <= pos[i]


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
        if isinstance(past, SlotView):  # one token per row (T == 1), each at its own position
            rows = torch.arange(B, device=x.device)
            past.k[rows, :, past.pos] = k[:, :, 0]
            past.v[rows, :, past.pos] = v[:, :, 0]
            width = past.mask.size(-1)
            y = F.scaled_dot_product_attention(q, past.k[:, :, :width], past.v[:, :, :width], attn_mask=past.mask)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), None
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past[1], v], dim=2)
        t_past = k.size(2) - T
        if t_past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token sees everything before it
        else:  # (T, T_past + T): new token i sees the past and new tokens <= i
            mask = torch.ones(T, t_past + T, dtype=torch.bool, device=x.device).tril(diagonal=t_past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


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


class GPT(nn.Module):
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

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) token ids -> logits (B, T, vocab) and the updated KV cache."""
        x, presents = self.hidden(idx, cache)
        return self.lm_head(x), presents  # (B, T, vocab)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) -> final-layer-norm hidden states (B, T, C) and the KV cache (task heads read these)."""
        B, T = idx.shape
        t_past = cache[0][0].size(2) if cache else 0
        if t_past + T > self.cfg.block_size:
            raise ValueError(f"sequence of {t_past + T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t_past, t_past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, cache[i] if cache else None)
            presents.append(present)
        return self.transformer.ln_f(x), presents

    def decode(self, idx: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """One new token for each of the cache's live rows: idx (n, 1) -> next-token logits (n, vocab).

        Every row sits at its own position and attends to its own past only,
        so sequences of any lengths, admitted at any step, decode together
        (iteration-level batching). The cache grows by one token per row.
        """
        n = idx.size(0)
        if n != cache.live:
            raise ValueError(f"{n} tokens for a cache with {cache.live} live rows")
        pos = cache.lengths[:n]
        if int(pos.max()) >= self.cfg.block_size:
            raise ValueError(f"a row is already {int(pos.max())} tokens long, block_size is {self.cfg.block_size}")
        keys = torch.arange(int(pos.max()) + 1, device=idx.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # (n, 1, 1, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)[:, None, :]  # (n, 1, C)
        for i, block in enumerate(self.transformer.h):
            x, _ = block(x, SlotView(cache.k[i, :n], cache.v[i, :n], pos, mask))
        cache.lengths[:n] += 1
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T), `ignore_index` positions skipped."""
        logits, _ = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N plus attention 12*L*C*T (PaLM, Chowdhery et al. 2022, app. B)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_embd * T

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extends idx (B, T) by up to `max_new_tokens`; temperature 0 is greedy.

        A row that emits a stop token keeps emitting it (the caller trims);
        generation ends early once every row has stopped.
        """
        steps = self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator)
        return torch.cat([idx, *steps], dim=1)

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """`generate`, one new token per row (B, 1) at a time, as soon as it is sampled.

        Uses the KV cache: one full forward over the prompt, then one token per step.
        """
        logits, cache = self(idx)
        length = idx.size(1)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        stops = torch.tensor(list(stop_tokens), dtype=idx.dtype, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if len(stops):
                nxt = torch.where(done[:, None], stops[0], nxt)
                done |= torch.isin(nxt[:, 0], stops)
            yield nxt
            length += 1
            if done.all() or length >= self.cfg.block_size:
                return
            logits, cache = self(nxt, cache)


class SlotCache:
    """A preallocated KV cache for iteration-level batching: room for `slots` sequences of up to
    block_size tokens. The live sequences are packed into slots 0..live-1, so a decode step reads
    views of one buffer and copies nothing; freeing a slot moves the last live row into it."""

    def __init__(self, cfg: GPTConfig, slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        shape = (cfg.n_layer, slots, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.live = slots, 0

    def add(self, cache: KVCache) -> int:
        """Copies one sequence's prefill cache (batch of 1) into the next free slot; returns the slot."""
        if self.live == self.slots:
            raise ValueError(f"all {self.slots} slots are live")
        slot, length = self.live, cache[0][0].size(2)
        for layer, (k, v) in enumerate(cache):
            self.k[layer, slot, :, :length] = k[0]
            self.v[layer, slot, :, :length] = v[0]
        self.lengths[slot] = length
        self.live += 1
        return slot

    def free(self, slot: int) -> None:
        """Frees `slot`; the last live row (if another) moves into it."""
        last = self.live - 1
        if slot != last:
            n = int(self.lengths[last])
            self.k[:, slot, :, :n] = self.k[:, last, :, :n]
            self.v[:, slot, :, :n] = self.v[:, last, :, :n]
            self.lengths[slot] = n
        self.live = last


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1): greedy at temperature 0, else top-k / nucleus sampling."""
    B = logits.size(0)
    return sample_rows(logits, torch.full((B,), float(temperature)), torch.full((B,), top_k or 0),
                       torch.full((B,), 1.0 if top_p is None else float(top_p)), [generator] * B)[:, None]


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """`sample_next` for a batch whose rows each have their own parameters, filtered in one pass:
    logits (n, V), temperature (n,) (0: greedy), top_k (n,) (0: off), top_p (n,) (1: off), one
    generator or None per row -> ids (n,). A row's draw depends only on its own logits, parameters and
    generator: one uniform number per row, mapped through the row's cumulative distribution (a
    multinomial draw would spend a random number per vocabulary entry)."""
    n, V = logits.shape
    out = logits.argmax(dim=-1)  # (n,)
    hot = (temperature > 0).nonzero().flatten().tolist()
    if not hot:
        return out
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]  # (n, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    if bool((k < V).any()):  # each row's k-th largest value, -inf for rows without top-k
        vals = torch.topk(x, int(k[k < V].max()), dim=-1).values  # (n, k_max)
        kth = vals.gather(1, (k.clamp(max=vals.size(1)) - 1)[:, None])  # (n, 1)
        x = x.masked_fill((x < kth) & (k < V)[:, None], float("-inf"))
    if bool((top_p < 1).any()):  # Holtzman et al. 2020, as in sample_next
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        p = sorted_x.softmax(dim=-1)
        remove = (p.cumsum(dim=-1) - p >= top_p[:, None]) & (top_p < 1)[:, None]
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(remove, float("-inf")))
    cdf = x.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in hot]).to(cdf.device)  # (h,)
    picked = torch.searchsorted(cdf[hot], (u * cdf[hot, -1])[:, None], right=True)[:, 0]  # first cdf > u
    out[hot] = picked.clamp(max=V - 1)
    return out
