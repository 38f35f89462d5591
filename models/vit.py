"""A Vision Transformer for image classification, with an embedding output (the final [CLS] state).

Dosovitskiy et al., "An Image is Worth 16x16 Words" (2020), https://arxiv.org/abs/2010.11929: the
image cut into patches, each linearly embedded, a learned [CLS] token and position embeddings, a
pre-norm Transformer encoder, and a linear head on the normed [CLS] state.

The Hugging Face twin is ViTForImageClassification: `to_hf_state_dict` / `from_hf_state_dict` map the
parameter names both ways (its saved layout: `vit.encoder.layer.N.attention.attention.query` ...),
`hf_config` / `config_from_hf` the configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_labels: int = 1000
    eps: float = 1e-12  # LayerNorm's, as ViT-Base has it
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim: {self.dim} is not a multiple of heads {self.heads}")
        if min(self.depth, self.heads, self.mlp_dim, self.channels, self.num_labels) < 1:
            raise ValueError("depth, heads, mlp_dim, channels and num_labels: at least 1")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def embed_dim(self) -> int:
        return self.dim


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q, self.k, self.v = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        B, T, D = x.shape
        q, k, v = (f(x).view(B, T, self.heads, D // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as ViT's hidden_act "gelu"


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps), nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn, self.mlp = Attention(cfg), Mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, cfg.patch_size)  # one patch -> one token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_labels)
        self.apply(self._init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The embedding: the [CLS] token's final, normed state. (B, C, H, W) -> (B, dim)."""
        B, _, H, W = pixels.shape
        if H != self.cfg.image_size or W != self.cfg.image_size:
            raise ValueError(f"images are {H}x{W}; this ViT takes {self.cfg.image_size}x{self.cfg.image_size}")
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, N + 1, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> logits (B, num_labels)
        return self.head(self.features(pixels))


# ---- Hugging Face names (ViTForImageClassification as saved) ----

_FIXED = {"patch.weight": "vit.embeddings.patch_embeddings.projection.weight",
          "patch.bias": "vit.embeddings.patch_embeddings.projection.bias",
          "cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
          "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
          "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.attention.query",
          "attn.k": "attention.attention.key", "attn.v": "attention.attention.value",
          "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def hf_name(name: str) -> str:
    if name in _FIXED:
        return _FIXED[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK:
        return f"vit.encoder.layer.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise KeyError(f"no Hugging Face name for ViT parameter {name!r}")


def to_hf_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    return {hf_name(k): v for k, v in model.state_dict().items()}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViTForImageClassification's saved names -> Helio's (its pooler, unused by the classifier, is
    left out); a name Helio does not know is an error."""
    back = {v: k for k, v in _FIXED.items()} | {f".{v}.": f".{k}." for k, v in _BLOCK.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("vit.pooler."):
            continue
        if key in back:
            out[back[key]] = value
            continue
        m = re.fullmatch(r"vit\.encoder\.layer\.(\d+)(\..+\.)(weight|bias)", key)
        if m is None or m.group(2) not in back:
            raise ValueError(f"Hugging Face ViT parameter {key!r} has no place in Helio's ViT")
        out[f"blocks.{m.group(1)}{back[m.group(2)]}{m.group(3)}"] = value
    return out


def hf_config(cfg: ViTConfig) -> dict:
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit", "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "num_channels": cfg.channels, "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
            "hidden_act": "gelu", "layer_norm_eps": cfg.eps, "qkv_bias": True, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "encoder_stride": cfg.patch_size}


def config_from_hf(hf: dict, num_labels: int, source: str) -> ViTConfig:
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise ValueError(f"{source}: Helio's ViT has exact GELU and biased q/k/v; this one has "
                         f"hidden_act {hf.get('hidden_act')!r}, qkv_bias {hf.get('qkv_bias')}")
    return ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf.get("num_channels", 3),
                     dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                     mlp_dim=hf["intermediate_size"], num_labels=num_labels, eps=hf.get("layer_norm_eps", 1e-12))
