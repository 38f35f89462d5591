"""Encoder: the BERT architecture in one file (Devlin et al., 2019).

Learned absolute positions, token-type (segment) embeddings, post-LayerNorm
blocks, exact (erf) GELU, a masked-LM head whose decoder is tied to the input
embeddings; attention through F.scaled_dot_product_attention with a padding
mask. Module names follow Hugging Face's BertForMaskedLM
(`bert.encoder.layer.0.attention.self.query.weight`, ...) so that export is a
straight copy of the state dict (models/hf.py). `embed` mean-pools the last
hidden states over real tokens, as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.decoding import packed


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 8192
    max_position: int = 512  # longest sequence (positions)
    type_vocab_size: int = 2  # segments A/B
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate_size: int | None = None  # None: 4 * n_embd
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    pad_id: int = 1  # `<|pad|>` in models/tokenizer.py

    def __post_init__(self) -> None:
        if self.intermediate_size is None:  # resolved here so asdict() and the export see the real size
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: must divide n_embd ({self.n_embd})")
        for name in ("vocab_size", "max_position", "type_vocab_size", "n_layer", "n_head", "n_embd",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            raise ValueError("layer_norm_eps: must be positive")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id: must be a token id below vocab_size ({self.vocab_size})")


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """`pos` (B, T): each token's position (packed rows restart it in every example); default 0..T-1."""
        if pos is None:
            pos = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, T, C)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, C)


class ResidualNorm(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm: how each post-LN sublayer ends."""

    def __init__(self, d_in: int, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))  # (B, T, C)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        # a ModuleDict because Hugging Face names the attention submodule `self`
        self.attention = nn.ModuleDict(dict(self=SelfAttention(cfg), output=ResidualNorm(cfg.n_embd, cfg)))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(cfg.n_embd, cfg.intermediate_size)))
        self.output = ResidualNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention["output"](self.attention["self"](x, mask), x)  # (B, T, C)
        h = F.gelu(self.intermediate["dense"](x))  # (B, T, 4C), exact erf GELU
        return self.output(h, x)


class MLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.transform = nn.ModuleDict(dict(
            dense=nn.Linear(cfg.n_embd, cfg.n_embd),
            LayerNorm=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps),
        ))
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # one tensor under both names, as in Hugging Face

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.transform["LayerNorm"](F.gelu(self.transform["dense"](h)))  # (..., C)
        return self.decoder(h)  # (..., vocab)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = nn.ModuleDict(dict(
            embeddings=Embeddings(cfg),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer)))),
        ))
        self.cls = nn.ModuleDict(dict(predictions=MLMHead(cfg)))
        self.apply(self._init_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied (Press & Wolf, 2017)
        with torch.no_grad():
            self.bert.embeddings.word_embeddings.weight[cfg.pad_id].zero_()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T) of 1 (token) / 0 (padding) -> last hidden states (B, T, C).
        `segments` (B, T) instead of a mask: packed rows (models.decoding.packed), each example attending
        to all of itself and nothing else, positions from 0 in each.

        A row whose mask is all 0 has nothing to attend to and comes out NaN.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_position:
            raise ValueError(f"sequence of {T} tokens exceeds max_position {self.cfg.max_position}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = None
        if segments is not None:
            view, pos = packed(segments, causal=False)
            mask = view.mask  # (B, 1, T, T)
        else:
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys seen
        x = self.bert.embeddings(input_ids, token_type_ids, pos)  # (B, T, C)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        return x

    def drop_mlm_head(self) -> "Encoder":
        """For task models that never predict tokens: an unused head would only be dead weight with no
        gradient (and trips ZeRO's gradient bookkeeping)."""
        del self.cls
        return self

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., C) -> masked-LM logits (..., vocab)."""
        return self.cls.predictions(hidden)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean masked-LM cross-entropy over positions whose label is not `ignore_index`."""
        hidden = self(input_ids, attention_mask)  # (B, T, C)
        picked = labels != ignore_index  # (B, T); the vocab projection runs on these ~15% only
        logits = self.mlm_logits(hidden[picked])  # (N, vocab)
        return F.cross_entropy(logits.float(), labels[picked])

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings (B, C): last hidden states averaged over non-padding tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self(input_ids, attention_mask)  # (B, T, C)
        m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied tensors counted once
        if non_embedding:
            emb = self.bert.embeddings
            n -= emb.position_embeddings.weight.numel() + emb.token_type_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N plus attention 12*L*C*T (PaLM, Chowdhery et al. 2022, app. B)."""
        T = seq_len or self.cfg.max_position
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_embd * T
