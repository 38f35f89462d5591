"""What every causal LM in Helio shares: attention over a KV cache, the slot cache of batched
decoding, generation and sampling.

A model (models/gpt.py, models/llama.py) subclasses `DecoderLM` and provides
`hidden(idx, cache) -> (final hidden states, cache)`, `lm_head`, `decode(idx, SlotCache)`,
`final_norm` (never quantized: it tells the activations' dtype and device) and a
`cfg` with `vocab_size`, `n_layer`, `n_kv_head`, `head_dim` and `block_size`; `generate`,
`stream` and `loss` come from here, and its attention layers call `attend`.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v of shape (B, n_kv_head, T_past, hs)


class SlotView(NamedTuple):
    """One layer's view of a SlotCache for a decode step: each row's T new k, v go in from its own position."""
    k: torch.Tensor  # (n, n_kv_head, length, hs), written in place
    v: torch.Tensor
    pos: torch.Tensor  # (n,) where each row's first new token sits
    mask: torch.Tensor  # (n, 1, T, W): key j is visible to row i's new token t


class Packed(NamedTuple):
    """Several examples in each row (packed finetuning): a token attends only inside its own example."""
    mask: torch.Tensor  # (B, 1, T, T): key j is visible to query i


def packed(segments: torch.Tensor, causal: bool = True, window: int | None = None) -> tuple[Packed, torch.Tensor]:
    """segments (B, T): which example each token belongs to (0: padding, after the examples) -> the
    block-diagonal attention mask (causal within an example unless `causal` is False; padding sees
    padding, so that no query row is empty) and each token's position inside its example (B, T)."""
    T = segments.size(1)
    i = torch.arange(T, device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    if causal:
        same &= i[None, :, None] >= i[None, None, :]
    if window is not None:
        same &= i[None, None, :] > i[None, :, None] - window
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a new example starts here
    starts = torch.where(first, i, torch.zeros_like(i)).cummax(dim=1).values  # (B, T)
    return Packed(same[:, None]), i - starts


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           past: tuple[torch.Tensor, torch.Tensor] | SlotView | Packed | None, dropout_p: float = 0.0,
           window: int | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Causal attention of the new tokens over the cached and new keys.

    q (B, n_head, T, hs); k, v (B, n_kv_head, T, hs), n_head a multiple of n_kv_head (grouped-query
    attention when fewer). `window`: a token sees only the `window` most recent positions, itself
    included (sliding-window attention). Returns y (B, n_head, T, hs) and the layer's new cache entry
    (None for a SlotView, which is written in place).
    """
    B, _, T, _ = q.shape
    gqa = k.size(1) != q.size(1)
    if isinstance(past, Packed):  # whole rows of packed examples: no cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=past.mask, dropout_p=dropout_p, enable_gqa=gqa), None
    if isinstance(past, SlotView):  # T tokens per row, each row from its own position
        rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
        at = past.pos[:, None] + torch.arange(T, device=q.device)  # (B, T)
        past.k[rows, :, at] = k.transpose(1, 2)  # indexed (B, T, n_kv_head, hs)
        past.v[rows, :, at] = v.transpose(1, 2)
        width = past.mask.size(-1)
        y = F.scaled_dot_product_attention(q, past.k[:, :, :width], past.v[:, :, :width], attn_mask=past.mask,
                                           enable_gqa=gqa)
        return y, None
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (B, n_kv_head, T_past + T, hs)
        v = torch.cat([past[1], v], dim=2)
    t_past, S = k.size(2) - T, k.size(2)
    if window is not None and window < S:  # (T, S): new token i (at t_past + i) sees keys in its window
        i = torch.arange(t_past, S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        mask, causal = (j <= i) & (j > i - window), False
    elif t_past == 0:
        mask, causal = None, True
    elif T == 1:
        mask, causal = None, False  # one new token sees everything before it
    else:  # (T, S): new token i sees the past and new tokens <= i
        mask, causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=t_past), False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                       enable_gqa=gqa)
    return y, (k, v)


def slot_mask(pos: torch.Tensor, new: int = 1, window: int | None = None) -> torch.Tensor:
    """pos (n,), `new` tokens per row -> the decode step's (n, 1, new, W) mask: row i's new token t
    (at pos[i] + t) sees keys j <= pos[i] + t (within the window)."""
    at = pos[:, None] + torch.arange(new, device=pos.device)  # (n, new)
    keys = torch.arange(int(pos.max()) + new, device=pos.device)  # (W,)
    visible = keys <= at[..., None]  # (n, new, W)
    if window is not None:
        visible &= keys > at[..., None] - window
    return visible[:, None]


class DecoderLM(nn.Module):
    """A decoder-only language model: next-token loss, generation and streaming over its KV cache."""

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) token ids -> logits (B, T, vocab) and the updated KV cache. `segments` (B, T): rows
        of packed examples (`packed`), each example attending to itself only, positions from 0 in each."""
        x, presents = self.hidden(idx, cache, segments)
        return self.lm_head(x), presents  # (B, T, vocab)

    @property
    def has_lm_head(self) -> bool:
        """False for an embedding model (`drop_lm_head`): hidden states in, no token logits out."""
        return hasattr(self, "lm_head")

    def drop_lm_head(self) -> "DecoderLM":
        """For a model that embeds and never predicts tokens: an untied head would be dead weight with no
        gradient; a tied one stays as the input embeddings."""
        if self.has_lm_head:  # an embedding model loaded from its own export has none already
            del self.lm_head
        return self

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings (B, C): the final hidden state of each row's last real token, the only one
        that has seen the whole text under causal attention (last-token pooling, as decoder embedders
        such as E5-Mistral and gte-Qwen2 pool). `attention_mask` (B, T): 1 for real tokens, padding after."""
        h, _ = self.hidden(input_ids)  # (B, T, C)
        last = (attention_mask.sum(dim=1) - 1 if attention_mask is not None
                else torch.full((input_ids.size(0),), input_ids.size(1) - 1, device=input_ids.device))
        return h[torch.arange(input_ids.size(0), device=input_ids.device), last.long()]  # (B, C)

    def past_length(self, idx: torch.Tensor, cache: KVCache | None) -> int:
        """How many tokens `cache` holds; refuses a sequence that would outgrow block_size."""
        t_past = cache[0][0].size(2) if cache else 0
        if t_past + idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence of {t_past + idx.size(1)} tokens exceeds block_size {self.cfg.block_size}")
        return t_past

    def slot_positions(self, idx: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """Where each live row's first new token (idx (n, T)) sits, (n,); refuses rows that would outgrow
        the cache."""
        n, T = idx.shape
        if n != cache.live:
            raise ValueError(f"{n} rows of tokens for a cache with {cache.live} live rows")
        pos = cache.lengths[:n]
        if int(pos.max()) + T > cache.length:
            raise ValueError(f"a row of {int(pos.max())} tokens cannot take {T} more, the cache holds {cache.length}")
        return pos

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             segments: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T), `ignore_index` positions skipped; `segments` as
        `forward` takes them (packed rows)."""
        logits, _ = self(idx, segments=segments)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Extends idx (B, T) by up to `max_new_tokens`; `sampling` as `stream` takes it (temperature 0
        is greedy). A row that emits a stop token keeps emitting it (the caller trims); generation
        ends early once every row has stopped."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **sampling)], dim=1)

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


def column_major(model: nn.Module) -> nn.Module:
    """Stores every float nn.Linear weight of a CPU model transposed in memory: the same (out, in)
    values, column-major, so F.linear multiplies x (M, in) by a contiguous (in, out) matrix. For the
    few rows of a decode step (one per sequence, a few more with drafts) MKL's kernel for that layout
    is faster: a 4 x 512 Llama's decode step, one thread, 1 row x 5 tokens 6.9 -> 5.8 ms, 8 rows x 5
    tokens 17.5 -> 14.1 ms (Intel Xeon, 2026-12-06). For inference: the values, names and shapes are
    unchanged, only the strides."""
    for m in model.modules():
        w = m.weight if type(m) is nn.Linear else None
        if w is not None and type(w.data) is torch.Tensor and w.device.type == "cpu" and w.is_floating_point() \
                and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
    return model


class SlotCache:
    """A preallocated KV cache for iteration-level batching: room for `slots` sequences of up to
    `length` tokens (block_size unless capped), sized by the model's KV heads. The live sequences
    are packed into slots 0..live-1, so a decode step reads views of one buffer and copies nothing;
    freeing a slot moves the last live row into it."""

    def __init__(self, cfg, slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, length: int | None = None):
        """`length`: tokens per slot, at most block_size (the default): a context cap below the model's own."""
        self.length = min(length or cfg.block_size, cfg.block_size)
        shape = (cfg.n_layer, slots, cfg.n_kv_head, self.length, cfg.head_dim)
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
    B, device = logits.size(0), logits.device
    return sample_rows(logits, torch.full((B,), float(temperature), device=device),
                       torch.full((B,), top_k or 0, device=device),
                       torch.full((B,), 1.0 if top_p is None else float(top_p), device=device), [generator] * B)[:, None]


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
    draws = [torch.rand((), generator=g, device=g.device if g is not None else "cpu")  # seeds are CPU generators
             for g in (generators[i] for i in hot)]
    u = torch.stack(draws).to(cdf.device)  # (h,)
    picked = torch.searchsorted(cdf[hot], (u * cdf[hot, -1])[:, None], right=True)[:, 0]  # first cdf > u
    out[hot] = picked.clamp(max=V - 1)
    return out
