"""How a base checkpoint becomes a task model, and how a finetuned one is written back out.

Shared by the training workers (build, then export from gathered weights), the
evaluation task and the merge step, so every one of them builds exactly the
same module tree and parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from models.decoding import DecoderLM
from models.encoder import Encoder
from models.gpt import GPT
from models.hf import load_model, save_classifier, save_model
from models.llama import Llama
from models.lora import LoraSpec, adapter_state_dict, add_lora, merge_lora, save_adapter
from models.task_heads import TASK_KINDS, SequenceClassifier

METHODS = ("full", "lora")


@dataclass(frozen=True)
class TaskSpec:
    """What a finetuning worker builds on top of the base model."""

    kind: str = "sft"  # sft | classify | embed | image_classify (models/image_finetune.py)
    method: str = "full"  # full | lora
    lora: LoraSpec = field(default_factory=LoraSpec)
    labels: tuple[str, ...] = ()  # classify: the class names, in id order
    temperature: float = 0.05  # embed: softmax temperature of the contrastive loss
    dropout: float | None = None  # overrides the base checkpoint's dropout; None: keep it
    scratch: bool = False  # image_classify: the base's architecture freshly initialised (the transfer baseline)

    def __post_init__(self) -> None:
        if self.kind not in (*TASK_KINDS, "image_classify"):
            raise ValueError(f"kind: must be one of {', '.join(TASK_KINDS)}, image_classify, not {self.kind!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: must be full or lora, not {self.method!r}")
        if not self.temperature > 0:
            raise ValueError("temperature: must be positive")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout: must be in [0, 1)")


def arch_of(model: nn.Module) -> str:
    return "gpt" if isinstance(model, GPT) else "llama" if isinstance(model, Llama) else "encoder"


def check_base(kind: str, base: nn.Module, source: str) -> None:
    """Which bases a task can start from, one clear sentence when it cannot."""
    if kind == "sft" and not isinstance(base, DecoderLM):
        raise ValueError(f"task sft needs a causal LM (GPT or Llama) base; {source} is a {type(base).__name__}")
    if kind == "embed" and not isinstance(base, (Encoder, Llama)):
        raise ValueError(f"task embed needs an encoder (BERT) or Llama-family base; {source} is a "
                         f"{type(base).__name__}")
    if not isinstance(base, (DecoderLM, Encoder)):
        raise ValueError(f"{source} is a {type(base).__name__}, not a GPT, Llama or encoder base to finetune from")


def set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # attention dropout kept as a float
            m.dropout = p


def build_task_model(spec: TaskSpec, base_folder: str | Path) -> tuple[nn.Module, tuple[str, ...]]:
    """(task model, names of its freshly initialised head modules). Deterministic given the torch seed."""
    base = load_model(base_folder)
    check_base(spec.kind, base, str(base_folder))
    if spec.dropout is not None:
        set_dropout(base, spec.dropout)
    if spec.kind == "classify":
        model: nn.Module = SequenceClassifier(base, len(spec.labels), dropout=spec.dropout or 0.0)
        head = model.head
    else:
        model, head = base, ()
        if spec.kind == "embed":  # hidden states only: the token-predicting head would get no gradient
            model = base.drop_mlm_head() if isinstance(base, Encoder) else base.drop_lm_head()
    if spec.method == "lora":
        model = add_lora(model, spec.lora, arch_of(base), trainable=head)
    return model, head


def export_task_model(spec: TaskSpec, model: nn.Module, head: tuple[str, ...], folder: str | Path,
                      state: dict[str, torch.Tensor], pad_id: int, base_name: str = "") -> list[str]:
    """Loads the finetuned weights `state` into `model` (a fresh `build_task_model`) and writes it out.

    `state` is keyed like `model.state_dict()`: every weight for full
    finetuning, the trainable ones (adapters and head) for LoRA. Writes
    `model/` (a Hugging Face folder; for LoRA the merged model) and for LoRA
    also `adapter/` (PEFT format, names as on the exported Hugging Face
    model). Returns the paths written, relative to `folder`.
    """
    folder = Path(folder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - state.keys())
    empty = sorted(k for k in trainable & state.keys() if state[k].numel() == 0)
    if absent or empty:
        raise RuntimeError(f"finetuned weights incomplete: missing {absent[:3]}, empty (ungathered shards) {empty[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or (spec.method == "full" and set(missing) - tied):
        raise RuntimeError(f"finetuned weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    written = []
    if spec.method == "lora":
        backbone = model.backbone if isinstance(model, SequenceClassifier) else model
        rename = hf_adapter_name(spec.kind)
        tensors = {rename(k): v for k, v in adapter_state_dict(model, None, head).items()}
        names = save_adapter(folder / "adapter", tensors, spec.lora, arch_of(backbone),
                             trainable=tuple(rename(h) for h in head), base=base_name,
                             hf_conv1d=isinstance(backbone, GPT))
        written += [f"adapter/{n}" for n in names]
        model = merge_lora(model)
    if isinstance(model, SequenceClassifier):
        names = save_classifier(model, folder / "model", list(spec.labels), pad_id)
    else:
        names = save_model(model, folder / "model")
    return written + [f"model/{n}" for n in names]


def hf_adapter_name(kind: str):
    """Helio parameter names -> the names the same module has in the exported Hugging Face model."""
    prefix = "base_model.model."

    def rename(key: str) -> str:
        inner = key.removeprefix(prefix) if key.startswith(prefix) else key
        if kind == "classify":
            inner = SequenceClassifier.hf_name(inner)
        elif kind == "embed":  # exported as BertModel or LlamaModel (Qwen2Model, ...): no prefix
            inner = inner.removeprefix("bert.").removeprefix("model.")
        return prefix + inner if key.startswith(prefix) else inner

    return rename


def flops_per_token(spec: TaskSpec, model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token of the task model (the MFU numerator), from the backbone's 6N + attention:
    no vocabulary projection unless the task predicts tokens, and under LoRA no weight gradients for the
    frozen base (4N instead of 6N; the adapters' own FLOPs are negligible)."""
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    flops = backbone.flops_per_token(seq_len)
    if spec.kind != "sft":
        flops -= 6 * backbone.cfg.vocab_size * backbone.cfg.n_embd
    return flops * 2 // 3 if spec.method == "lora" else flops
