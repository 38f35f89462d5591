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
from models.resnet import ResNet, ResNetConfig
from models.vit import ViT, ViTConfig

ARCHS = ("gpt", "llama", "encoder", "resnet", "vit")
CAUSAL = ("gpt", "llama")  # next-token pretraining; the encoder is a masked LM
VISION = ("resnet", "vit")  # image classifiers: their input size, channels and labels come from an image dataset
LLAMA_ONLY = {"n_kv_head": 0, "rope_theta": 10000.0, "tie_embeddings": False}  # defaults
VISION_ONLY = {"patch_size": 0, "widths": (), "depths": (), "bottleneck": False, "stem_width": 0}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"  # gpt: causal LM (GPT-2); llama: causal LM (Llama 3 / Qwen2 / Mistral); encoder: masked LM
    #                    (BERT); resnet, vit: image classifiers (n_layer, n_head, n_embd are a ViT's depth, heads, width)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    # llama only
    n_kv_head: int = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0: n_head
    intermediate_size: int = 0  # llama: the SwiGLU width (0: 8/3 n_embd rounded up to 32); vit: the MLP's (0: 4 n_embd)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    # vit only
    patch_size: int = 0  # pixels a side of one patch (one token); must divide the dataset's image size
    # resnet only
    widths: tuple[int, ...] = ()  # each stage's output channels
    depths: tuple[int, ...] = ()  # blocks a stage
    bottleneck: bool = False  # bottleneck blocks (ResNet-50 style); else basic (ResNet-18 style)
    stem_width: int = 0  # the 7x7 stem's channels; 0: widths[0]

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
        if self.intermediate_size and self.arch not in ("llama", "vit"):
            raise ValueError(f"intermediate_size: only arch llama and vit have it, not {self.arch}")
        vision = {k for k, v in VISION_ONLY.items() if getattr(self, k) != v}
        wrong = vision - ({"patch_size"} if self.arch == "vit" else set(VISION_ONLY) - {"patch_size"}
                          if self.arch == "resnet" else set())
        if wrong:
            raise ValueError(f"{sorted(wrong)[0]}: arch {self.arch} has no such setting")
        if self.arch == "vit" and self.patch_size < 1:
            raise ValueError("patch_size: a vit needs one (pixels a side of a patch)")
        if self.arch == "resnet" and (not self.widths or len(self.widths) != len(self.depths)):
            raise ValueError("widths, depths: a resnet needs one of each per stage")

    def identity(self) -> dict:
        """What a checkpoint of this model must agree on: every field, but another architecture's own ones
        (always their defaults) left out, so that runs checkpointed before they existed still resume."""
        skip = (set() if self.arch == "llama" else set(LLAMA_ONLY)) | \
            (set() if self.arch in ("llama", "vit") else {"intermediate_size"}) | \
            (set() if self.arch in VISION else set(VISION_ONLY))
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


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


def build_vision_model(cfg: ModelConfig, image_size: int, channels: int, num_labels: int) -> nn.Module:
    """A freshly initialised ResNet or ViT for `image_size`-pixel images of `channels` channels."""
    if cfg.arch == "resnet":
        return ResNet(ResNetConfig(channels=channels, stem_width=cfg.stem_width or cfg.widths[0], widths=cfg.widths,
                                   depths=cfg.depths, bottleneck=cfg.bottleneck, num_labels=num_labels))
    if cfg.arch == "vit":
        return ViT(ViTConfig(image_size=image_size, patch_size=cfg.patch_size, channels=channels, dim=cfg.n_embd,
                             depth=cfg.n_layer, heads=cfg.n_head, mlp_dim=cfg.intermediate_size or 4 * cfg.n_embd,
                             num_labels=num_labels, dropout=cfg.dropout))
    raise ValueError(f"arch: {cfg.arch} is not a vision model ({', '.join(VISION)})")
