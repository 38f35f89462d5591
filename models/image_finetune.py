"""How a pretrained vision checkpoint becomes an image classifier for a new set of labels, and how the
finetuned model is written back out (the image side of models/finetune.py).

The backbone keeps its weights; the classifier (ResNet `fc`, ViT `head`) is replaced by a fresh one of
the new labels. Full finetuning trains everything; LoRA (ViT only: its attention and MLP projections)
trains the adapters and the new head. `scratch` builds the same architecture freshly initialised: the
baseline that measures what pretraining was worth.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from models.hf_vision import empty_vision, family_of, load_vision, save_vision
from models.lora import DEFAULT_TARGETS, add_lora, adapter_state_dict, merge_lora, save_adapter

HEAD = {"resnet": "fc", "vit": "head"}


def build_image_task_model(method: str, lora, labels: tuple[str, ...], base_folder: str | Path,
                           scratch: bool = False) -> tuple[nn.Module, tuple[str, ...], int]:
    """(task model, names of its fresh head modules, the base's image size). Deterministic given the torch
    seed."""
    model, _, size = empty_vision(base_folder) if scratch else load_vision(base_folder)
    family = family_of(model)
    head = HEAD[family]
    setattr(model, head, nn.Linear(model.cfg.embed_dim, len(labels)))
    model.cfg = type(model.cfg)(**{**model.cfg.__dict__, "num_labels": len(labels)})
    if method == "lora":
        if family != "vit":
            raise ValueError(f"method lora: Helio adapts a ViT's attention and MLP; {base_folder} is a {family} "
                             f"(convolutions): finetune it with method full")
        model = add_lora(model, lora, "vit", trainable=(head,))
    return model, (head,), size


def export_image_task_model(method: str, lora, labels: tuple[str, ...], model: nn.Module, head: tuple[str, ...],
                            folder: str | Path, state: dict[str, torch.Tensor], image_size: int,
                            base_name: str = "") -> list[str]:
    """Loads the finetuned weights `state` (every weight for full finetuning; adapters and head for LoRA)
    into `model` (a fresh `build_image_task_model`) and writes `model/` (a Hugging Face folder; for LoRA the
    merged model) and for LoRA `adapter/` (PEFT format, module names as on ViTForImageClassification)."""
    folder = Path(folder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - state.keys())
    if absent:
        raise RuntimeError(f"finetuned weights incomplete: missing {absent[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (method == "full" and missing):
        raise RuntimeError(f"finetuned weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    written = []
    if method == "lora":
        tensors = {hf_adapter_key(k): v for k, v in adapter_state_dict(model, None, head).items()}
        targets = tuple(sorted({hf_module(t) for t in lora.targets or DEFAULT_TARGETS["vit"]}))
        names = save_adapter(folder / "adapter", tensors, type(lora)(**{**lora.__dict__, "targets": targets}), "vit",
                             trainable=("classifier",), base=base_name)
        written += [f"adapter/{n}" for n in names]
        model = merge_lora(model)
    names = save_vision(model, folder / "model", list(labels), image_size)
    return written + [f"model/{n}" for n in names]


# transformers' ViTForImageClassification module names (5.x, in memory: what peft targets; its saved
# checkpoint keys are the older attention.attention.query ... names, which models/vit.py maps)
_HF_MODULES = {"attn.q": "attention.q_proj", "attn.k": "attention.k_proj", "attn.v": "attention.v_proj",
               "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def hf_module(name: str) -> str:
    """A ViT module's name (or a target suffix) as transformers' ViTForImageClassification has it in memory."""
    if name == "head":
        return "classifier"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        return f"vit.layers.{m.group(1)}.{_HF_MODULES[m.group(2)]}"
    return _HF_MODULES.get(name, name)


def hf_adapter_key(key: str) -> str:
    """`base_model.model.blocks.3.attn.q.lora_A.weight` -> the same tensor under transformers' module names
    (`base_model.model.vit.layers.3.attention.q_proj.lora_A.weight`); the head's are `classifier.*`."""
    prefix = "base_model.model."
    inner = key.removeprefix(prefix)
    for lora_part in (".lora_A.", ".lora_B."):
        if lora_part in inner:
            module, rest = inner.split(lora_part, 1)
            return prefix + hf_module(module) + lora_part + rest
    module, _, param = inner.rpartition(".")
    return prefix + hf_module(module) + "." + param
