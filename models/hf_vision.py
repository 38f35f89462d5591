"""Vision models (models/resnet.py, models/vit.py) as Hugging Face folders: ResNetForImageClassification
and ViTForImageClassification, with label names in config.json and the pixel preprocessing in
preprocessor_config.json, so `transformers` loads an exported model and gets the same logits.

Helio's pixels: uint8, scaled to [0, 1], then normalised with mean 0.5 and std 0.5 per channel (what
ViTImageProcessor does by default); preprocessor_config.json says so for both families.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models import resnet, vit

VisionModel = resnet.ResNet | vit.ViT
FAMILY = {"resnet": resnet, "vit": vit}
MEAN, STD = 0.5, 0.5


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255) pixels (B, H, W, C) -> the models' input (B, C, H, W), float."""
    return (pixels.float().div(255.0).permute(0, 3, 1, 2) - MEAN) / STD


def family_of(model: VisionModel) -> str:
    return "resnet" if isinstance(model, resnet.ResNet) else "vit"


def save_vision(model: VisionModel, folder: str | Path, labels: list[str], image_size: int) -> list[str]:
    """config.json, model.safetensors and preprocessor_config.json of `model`; returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = FAMILY[family_of(model)]
    if len(labels) != model.cfg.num_labels:
        raise ValueError(f"{len(labels)} label names for a model of {model.cfg.num_labels} outputs")
    config = family.hf_config(model.cfg) | {
        "num_labels": len(labels), "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)}, "helio_image_size": image_size}
    state = {k: t.detach().float().cpu().contiguous() for k, t in family.to_hf_state_dict(model).items()}
    channels = model.cfg.channels
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": image_size, "width": image_size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [MEAN] * channels,
                 "image_std": [STD] * channels}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors", "preprocessor_config.json"]


def vision_config(hf: dict, source: str) -> tuple[str, resnet.ResNetConfig | vit.ViTConfig, list[str], int]:
    """(family, model config, label names, image size) a config.json describes."""
    family = hf.get("model_type")
    if family not in FAMILY:
        raise ValueError(f"{source}: model_type {family!r} is not resnet or vit")
    labels = [hf["id2label"][str(i)] for i in range(len(hf.get("id2label") or {}))]
    if not labels:
        raise ValueError(f"{source}: config.json names no labels (id2label)")
    cfg = FAMILY[family].config_from_hf(hf, len(labels), source)
    return family, cfg, labels, hf.get("helio_image_size") or hf.get("image_size") or 224


def empty_vision(folder: str | Path) -> tuple[VisionModel, list[str], int]:
    """The model config.json describes, freshly initialised; (model, label names, image size)."""
    hf = json.loads((Path(folder) / "config.json").read_text())
    family, cfg, labels, size = vision_config(hf, str(folder))
    return (resnet.ResNet(cfg) if family == "resnet" else vit.ViT(cfg)), labels, size


def load_vision(folder: str | Path) -> tuple[VisionModel, list[str], int]:
    """(model with its weights, label names, image size) of a ResNet/ViTForImageClassification folder."""
    model, labels, size = empty_vision(folder)
    family = FAMILY[family_of(model)]
    try:
        state = family.from_hf_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: weights do not fit a {family_of(model)} of this config: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    return model, labels, size
