"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on Helio's models, through `peft`.

`add_lora` injects peft's LoRA layers into a GPT, Encoder or task model in
place: each targeted nn.Linear becomes a peft `lora.Linear` whose frozen
`base_layer` keeps the pretrained weight and whose `lora_A`/`lora_B` start at
A ~ kaiming, B = 0, so the model at init computes exactly what the base does.
Everything else is frozen except the modules named in `trainable` (a fresh
task head). Adapters leave in PEFT's own format (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`),
which `peft.PeftModel.from_pretrained` loads onto the exported Hugging Face
model; `merge_lora` folds W + (alpha/r)·B·A into the base weights.

peft is imported by the functions that use it, not by this module: importing it
pulls in transformers (seconds of CPU), which every Ray Train worker, evaluator
and serve replica would otherwise pay whether or not it uses LoRA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in saved adapters

# Where LoRA goes when the config names nothing: every attention and MLP projection.
DEFAULT_TARGETS = {"gpt": ("c_attn", "c_proj", "c_fc"),
                   "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   "encoder": ("query", "key", "value", "output.dense", "intermediate.dense"),  # not the pooler
                   "vit": ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")}


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # nn.Linear names (suffixes), e.g. [query, value]; empty: DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank: must be at least 1")
        if self.alpha <= 0:
            raise ValueError("alpha: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")

    def peft_config(self, arch: str, trainable: tuple[str, ...] = (), hf_conv1d: bool = False) -> LoraConfig:
        """peft's config. `hf_conv1d`: for Hugging Face GPT-2, whose projections are Conv1D (transposed);
        the A/B matrices are the same either way, only the merge transposes."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets or DEFAULT_TARGETS[arch]), bias="none",
                          modules_to_save=list(trainable) or None, exclude_modules=list(trainable) or None,
                          fan_in_fan_out=hf_conv1d)


def add_lora(model: nn.Module, spec: LoraSpec, arch: str, trainable: tuple[str, ...] = ()) -> nn.Module:
    """Injects LoRA into `model` (in place, returned); freezes all but the adapters and `trainable` modules."""
    from peft import inject_adapter_in_model

    targets = spec.targets or DEFAULT_TARGETS[arch]
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not any(n == t or n.endswith("." + t) for n in linear for t in targets):
        raise ValueError(f"lora.targets {list(targets)} match no nn.Linear of the {arch} model "
                         f"(it has e.g. {sorted({n.rsplit('.', 1)[-1] for n in linear})})")
    config = spec.peft_config(arch)
    config.exclude_modules = set(trainable) or None  # a head is trained whole, not adapted
    model = inject_adapter_in_model(config, model)  # freezes the base
    for name in trainable:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None,
                       trainable: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter (and `trainable` head) tensors under PEFT's saved key names.

    `state`: full, gathered weights keyed like `model.state_dict()`; pass it
    when the module's own parameters are ZeRO-3 shards, or the adapter saved
    would be empty tensors.
    """
    from peft.utils import get_peft_model_state_dict

    state = state if state is not None else model.state_dict()
    out = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model, state_dict=state).items()}
    for name in trainable:
        out.update({f"{PEFT_PREFIX}{k}": v for k, v in state.items() if k.startswith(name + ".")})
    for k, v in out.items():
        if v.numel() == 0:
            raise RuntimeError(f"adapter tensor {k} is empty: a ZeRO-3 shard was saved without being gathered")
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, arch: str,
                 trainable: tuple[str, ...] = (), base: str = "", hf_conv1d: bool = False) -> list[str]:
    """Writes `adapter_config.json` + `adapter_model.safetensors`; returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(arch, trainable, hf_conv1d).to_dict()
    config["base_model_name_or_path"] = base
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=list))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def read_adapter(folder: str | Path) -> tuple[LoraSpec, tuple[str, ...], dict[str, torch.Tensor]]:
    """(spec, trainable modules, tensors) of a PEFT adapter folder."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"'{folder}' has no {name}: not a PEFT adapter folder")
    c = json.loads((folder / ADAPTER_CONFIG).read_text())
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {c.get('peft_type')!r} is not LORA")
    targets = c["target_modules"]
    spec = LoraSpec(rank=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
                    targets=tuple(sorted(targets) if isinstance(targets, (list, set)) else [targets]))
    return spec, tuple(c.get("modules_to_save") or ()), load_file(str(folder / ADAPTER_WEIGHTS))


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and puts the plain nn.Linear back (in place, returned)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}
