"""int8 for the vision models, with PyTorch's own x86 quantization flows (no kernels written here).

- ResNet: static post-training quantization in eager mode. Each convolution's BatchNorm is folded into
  it, convolution + ReLU pairs become one fused module, the residual sum is a quantizable add-ReLU,
  observers (the "x86" qconfig: histogram activations with reduce_range, so fbgemm's AVX2 path cannot
  saturate where VNNI would not; per-channel weights) are calibrated on held-out images, and
  `convert` swaps in int8 convolutions and linear layers.
- ViT: dynamic int8 of every Linear (weights int8 per channel, activations quantized per batch at run
  time), the flow PyTorch recommends for transformers on CPU; patch embedding and LayerNorms stay fp32.

A quantized model is saved as plain tensors (safetensors: int8 weights, their scales and zero points,
activation scales, and the float tensors left), never pickled; `load_int8_vision` rebuilds the module
tree from the float config and puts them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.ao.quantization import (DeQuantStub, QuantStub, convert, get_default_qconfig, per_channel_dynamic_qconfig,
                                   prepare, quantize_dynamic)
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.hf_vision import empty_vision
from models.resnet import Block, ResNet
from models.vit import ViT

ENGINE = "x86"
INT8_FILE, INT8_CONFIG = "model.safetensors", "quantization.json"


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> nn.Module:
    fused = fuse_conv_bn_eval(conv, bn)
    return nni.ConvReLU2d(fused, nn.ReLU()) if relu else fused


class QBlock(nn.Module):
    """A residual block with BatchNorm folded, fused Conv-ReLU, and a quantizable add-ReLU."""

    def __init__(self, block: Block):
        super().__init__()
        self.bottleneck = block.bottleneck
        self.conv1 = _conv_bn(block.conv1, block.bn1, relu=True)
        self.conv2 = _conv_bn(block.conv2, block.bn2, relu=block.bottleneck)
        self.conv3 = _conv_bn(block.conv3, block.bn3, relu=False) if block.bottleneck else None
        self.downsample = (_conv_bn(block.downsample[0], block.downsample[1], relu=False)
                           if block.downsample is not None else None)
        self.add_relu = nnq.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.conv3 is not None:
            out = self.conv3(out)
        return self.add_relu.add_relu(out, x if self.downsample is None else self.downsample(x))


class QResNet(nn.Module):
    """The ResNet's eager-mode quantizable twin: quantize at the input, dequantize the logits."""

    def __init__(self, model: ResNet):
        super().__init__()
        model = model.eval()
        self.cfg = model.cfg
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.stem = _conv_bn(model.conv1, model.bn1, relu=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.Sequential(*(nn.Sequential(*(QBlock(b) for b in stage)) for stage in model.stages()))
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = model.fc

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) float -> logits (B, labels)
        x = self.stages(self.pool(self.stem(self.quant(pixels))))
        return self.dequant(self.fc(torch.flatten(self.avg(x), 1)))


def quantize_vision(model: nn.Module, calibration: Iterable[torch.Tensor]) -> tuple[nn.Module, dict]:
    """(int8 model, its description). `calibration`: batches of normalised images (B, C, H, W) the
    ResNet's activation observers see; the ViT's dynamic quantization needs none."""
    torch.backends.quantized.engine = ENGINE
    if isinstance(model, ViT):
        q = quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return q, {"method": "int8", "scheme": "dynamic", "engine": ENGINE, "layers": "every nn.Linear"}
    if not isinstance(model, ResNet):
        raise TypeError(f"cannot quantize a {type(model).__name__} here: a ResNet or ViT")
    q = QResNet(model)
    q.qconfig = get_default_qconfig(ENGINE)
    prepare(q, inplace=True)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            q(batch)
            seen += len(batch)
    if not seen:
        raise ValueError("static quantization needs calibration images; none were given")
    convert(q, inplace=True)
    return q.eval(), {"method": "int8", "scheme": "static", "engine": ENGINE, "calibration_images": seen,
                      "layers": "every convolution (BatchNorm folded, ReLU fused) and the classifier"}


# ---- as plain tensors ----

def _quantized_layers(q: nn.Module):
    for name, m in q.named_modules():
        if isinstance(m, (nnq.Conv2d, nnq.Linear, nnqd.Linear)):
            yield name, m


def int8_tensors(q: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a quantized vision model needs, none of them a quantized (packed) tensor."""
    out: dict[str, torch.Tensor] = {}
    owned = set()
    for name, m in _quantized_layers(q):
        w, b = m.weight(), m.bias()
        out[f"{name}.weight.int8"] = w.int_repr()
        out[f"{name}.weight.scales"] = w.q_per_channel_scales().float()
        out[f"{name}.weight.zero_points"] = w.q_per_channel_zero_points().to(torch.int32)
        if b is not None:
            out[f"{name}.bias"] = b.detach()
        owned.add(name)
    for name, m in q.named_modules():
        if isinstance(m, (nnq.Conv2d, nnq.Linear, nnq.Quantize, nnq.QFunctional)):  # activation qparams
            out[f"{name}.act.scale"] = torch.tensor([float(m.scale)])
            out[f"{name}.act.zero_point"] = torch.tensor([int(m.zero_point)], dtype=torch.int32)
            owned.add(name)
    for key, value in q.state_dict().items():  # what stayed float: LayerNorms, patch embedding, positions
        module = key.rpartition(".")[0]
        if isinstance(value, torch.Tensor) and not value.is_quantized and value.is_floating_point() and \
                not any(module == o or module.startswith(o + ".") for o in owned):
            out[key] = value.detach()
    return {k: v.contiguous() for k, v in out.items()}


def put_int8_tensors(q: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `int8_tensors`, into a model of the same structure."""
    used = set()
    for name, m in _quantized_layers(q):
        scales, zps = tensors[f"{name}.weight.scales"], tensors[f"{name}.weight.zero_points"]
        w = torch._make_per_channel_quantized_tensor(tensors[f"{name}.weight.int8"], scales.double(),
                                                     zps.long(), 0)
        m.set_weight_bias(w, tensors.get(f"{name}.bias"))
        used |= {f"{name}.weight.int8", f"{name}.weight.scales", f"{name}.weight.zero_points", f"{name}.bias"}
    for name, m in q.named_modules():
        if f"{name}.act.scale" in tensors:
            scale, zp = float(tensors[f"{name}.act.scale"][0]), int(tensors[f"{name}.act.zero_point"][0])
            if isinstance(m, nnq.Quantize):
                m.scale.fill_(scale)
                m.zero_point.fill_(zp)
            else:
                m.scale, m.zero_point = scale, zp
            used |= {f"{name}.act.scale", f"{name}.act.zero_point"}
    for key, value in tensors.items():  # the float rest, tensor by tensor (a quantized module's own
        if key in used:                  # _load_from_state_dict would want its packed weights too)
            continue
        module, _, attr = key.rpartition(".")
        target = getattr(q.get_submodule(module), attr, None) if module else getattr(q, attr, None)
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise ValueError(f"int8 tensor {key} {tuple(value.shape)} has no place in this model")
        with torch.no_grad():
            target.copy_(value)


def save_int8_vision(q: nn.Module, desc: dict, folder: str | Path) -> list[str]:
    """model.safetensors (int8 weights, scales, zero points, activation scales, float rest) and
    quantization.json; the float config.json and preprocessor_config.json are the parent's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(int8_tensors(q), str(folder / INT8_FILE), metadata={"format": "pt", "helio": "int8-vision"})
    (folder / INT8_CONFIG).write_text(json.dumps(desc, indent=2))
    return [INT8_FILE, INT8_CONFIG]


def load_int8_vision(folder: str | Path) -> tuple[nn.Module, list[str], int]:
    """(int8 model, label names, image size) of a folder `save_int8_vision` wrote beside the float config."""
    folder = Path(folder)
    desc = json.loads((folder / INT8_CONFIG).read_text())
    skeleton, labels, size = empty_vision(folder)
    channels = skeleton.cfg.channels
    q, _ = quantize_vision(skeleton, [torch.zeros(1, channels, size, size)] if desc.get("scheme") == "static" else [])
    put_int8_tensors(q, load_file(str(folder / INT8_FILE)))
    return q.eval(), labels, size

