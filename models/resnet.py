"""ResNet for image classification, with an embedding output (the pooled features).

He et al., "Deep Residual Learning for Image Recognition" (2015), https://arxiv.org/abs/1512.03385,
with the stride of a bottleneck block on its 3x3 convolution ("ResNet v1.5", as torchvision and
Hugging Face build it).

Parameter names are torchvision's (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.{0,1}, fc), so
a torchvision or timm ResNet state dict loads as it is (`load_torchvision_state_dict`, shapes
checked). The Hugging Face twin is ResNetForImageClassification: `to_hf_state_dict` /
`from_hf_state_dict` map the names, `hf_config` / `config_from_hf` the configs (models/hf_vision.py
reads and writes the folders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ResNetConfig:
    channels: int = 3  # input channels: 1 greyscale, 3 RGB
    stem_width: int = 64  # the 7x7 stride-2 stem's output channels
    widths: tuple[int, ...] = (64, 128, 256, 512)  # each stage's output channels (x4 inside a bottleneck)
    depths: tuple[int, ...] = (2, 2, 2, 2)  # blocks a stage
    bottleneck: bool = False  # False: basic blocks (ResNet-18/34); True: bottlenecks (ResNet-50 and up)
    num_labels: int = 1000

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.depths) or not self.widths or min(self.depths) < 1:
            raise ValueError("widths and depths: one of each per stage, every stage at least one block")
        if self.bottleneck and any(w % 4 for w in self.widths):
            raise ValueError("widths: a bottleneck stage's width must be a multiple of 4")
        if self.channels < 1 or self.num_labels < 1:
            raise ValueError("channels and num_labels: at least 1")

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]


class Block(nn.Module):
    """A basic block (two 3x3 convolutions) or a bottleneck (1x1 down to width/4, 3x3, 1x1 up), and the
    projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool):
        super().__init__()
        self.bottleneck = bottleneck
        mid = c_out // 4 if bottleneck else c_out
        if bottleneck:
            self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c_out)
        else:
            self.conv1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(mid, c_out, 3, 1, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(mid), nn.BatchNorm2d(c_out if not bottleneck else mid)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(cfg.channels, cfg.stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        c_in = cfg.stem_width
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            blocks = [Block(c_in if j == 0 else width, width, 2 if i > 0 and j == 0 else 1, cfg.bottleneck)
                      for j in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_labels)
        for m in self.modules():  # He init for convolutions, BatchNorm as identity (torchvision's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.widths))]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The embedding: globally average-pooled last-stage features. (B, C, H, W) -> (B, widths[-1])."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(pixels))), 3, 2, 1)  # (B, stem, H/4, W/4)
        for stage in self.stages():
            x = stage(x)
        return x.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> logits (B, num_labels)
        return self.fc(self.features(pixels))


# ---- names of the other layouts ----

def to_hf_state_dict(model: ResNet) -> dict[str, torch.Tensor]:
    """Helio's (torchvision's) names -> ResNetForImageClassification's."""
    return {hf_name(k): v for k, v in model.state_dict().items()}


def hf_name(name: str) -> str:
    if name.startswith("fc."):
        return "classifier.1." + name[3:]
    if name.startswith(("conv1.", "bn1.")):
        part = "convolution" if name.startswith("conv1.") else "normalization"
        return f"resnet.embedder.embedder.{part}.{name.split('.', 1)[1]}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn)(\d)\.(.+)", name)
    if m:
        stage, block, kind, k, rest = m.groups()
        part = "convolution" if kind == "conv" else "normalization"
        return f"resnet.encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(k) - 1}.{part}.{rest}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.downsample\.([01])\.(.+)", name)
    if m:
        stage, block, k, rest = m.groups()
        part = "convolution" if k == "0" else "normalization"
        return f"resnet.encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{rest}"
    raise KeyError(f"no Hugging Face name for ResNet parameter {name!r}")


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ResNetForImageClassification's names -> Helio's; a name Helio does not know is an error."""
    out = {}
    for key, value in state.items():
        name = helio_name(key)
        if name is None:
            raise ValueError(f"Hugging Face ResNet parameter {key!r} has no place in Helio's ResNet")
        out[name] = value
    return out


def helio_name(hf: str) -> str | None:
    m = re.fullmatch(r"resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.(\d)|shortcut)\.(convolution|"
                     r"normalization)\.(.+)", hf)
    if m:
        stage, block, where, k, part, rest = m.groups()
        if where == "shortcut":
            return f"layer{int(stage) + 1}.{block}.downsample.{0 if part == 'convolution' else 1}.{rest}"
        return f"layer{int(stage) + 1}.{block}.{'conv' if part == 'convolution' else 'bn'}{int(k) + 1}.{rest}"
    m = re.fullmatch(r"resnet\.embedder\.embedder\.(convolution|normalization)\.(.+)", hf)
    if m:
        return f"{'conv1' if m.group(1) == 'convolution' else 'bn1'}.{m.group(2)}"
    if hf.startswith("classifier.1."):
        return "fc." + hf[len("classifier.1."):]
    return None


def config_from_state_dict(state: dict[str, torch.Tensor], num_labels: int | None = None) -> ResNetConfig:
    """The architecture a torchvision-named state dict holds (stages, depths, widths, block kind)."""
    if "conv1.weight" not in state:
        raise ValueError("not a torchvision/timm ResNet state dict: it has no conv1.weight")
    depths, widths = [], []
    while any(k.startswith(f"layer{len(depths) + 1}.") for k in state):
        i = len(depths) + 1
        depths.append(1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")))
        bottleneck = f"layer{i}.0.conv3.weight" in state
        widths.append(state[f"layer{i}.0.{'conv3' if bottleneck else 'conv2'}.weight"].shape[0])
    if not depths:
        raise ValueError("not a torchvision/timm ResNet state dict: it has no layer1")
    fc = state.get("fc.weight")
    return ResNetConfig(channels=state["conv1.weight"].shape[1], stem_width=state["conv1.weight"].shape[0],
                        widths=tuple(widths), depths=tuple(depths), bottleneck="layer1.0.conv3.weight" in state,
                        num_labels=num_labels or (fc.shape[0] if fc is not None else 1000))


def load_torchvision_state_dict(model: ResNet, state: dict[str, torch.Tensor], source: str,
                                head: bool = True) -> None:
    """Loads a torchvision/timm-style ResNet state dict into `model`: every name must be one of the
    model's and every shape the same (one sentence naming the first that is not). `head=False` leaves
    the classifier (fc) as initialised: a new task's labels."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} parameter(s) this ResNet does not have, e.g. {unknown[0]!r} "
                         f"(timm's names for the classifier: fc.*; a prefix such as 'module.' must be removed)")
    missing = sorted(k for k in set(own) - set(state) if head or not k.startswith("fc."))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} parameter(s) of this ResNet, e.g. {missing[0]!r}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, this ResNet's is {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=head)



def hf_config(cfg: ResNetConfig) -> dict:
    return {"architectures": ["ResNetForImageClassification"], "model_type": "resnet", "num_channels": cfg.channels,
            "embedding_size": cfg.stem_width, "hidden_sizes": list(cfg.widths), "depths": list(cfg.depths),
            "layer_type": "bottleneck" if cfg.bottleneck else "basic", "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False}


def config_from_hf(hf: dict, num_labels: int, source: str) -> ResNetConfig:
    if hf.get("hidden_act", "relu") != "relu" or hf.get("downsample_in_first_stage") or \
            hf.get("downsample_in_bottleneck"):
        raise ValueError(f"{source}: Helio's ResNet is v1.5 with ReLU and a stride-1 first stage; this one has "
                         f"hidden_act {hf.get('hidden_act')!r}, downsample_in_first_stage "
                         f"{hf.get('downsample_in_first_stage')}, downsample_in_bottleneck "
                         f"{hf.get('downsample_in_bottleneck')}")
    return ResNetConfig(channels=hf.get("num_channels", 3), stem_width=hf["embedding_size"],
                        widths=tuple(hf["hidden_sizes"]), depths=tuple(hf["depths"]),
                        bottleneck=hf.get("layer_type") == "bottleneck", num_labels=num_labels)
