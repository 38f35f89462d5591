"""Opening a model artifact, float or quantized, as a module that runs (quantize job, serving).

`open_runnable` is the way in for anything that serves a model: it verifies
the artifact (every file's sha256 against the manifest), refuses one whose
quality gate rejected it unless forced, and loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn as nn

from cluster.storage import Artifact, ArtifactError, Storage, fetch_folder, resolve
from models.decoding import DecoderLM
from models.encoder import EncoderConfig
from models.hf import empty_model, load_inference_model
from models.hf_llama import FAMILIES, is_headless
from models.quant import QUANT_CONFIG, load_quantized
from models.task_heads import SequenceClassifier

MODEL_FILES = ("config.json", "model.safetensors")
VISION_TYPES = ("resnet", "vit")  # image classifiers (models/hf_vision.py)


def check_servable(art: Artifact, force: bool = False) -> None:
    """Refuses a model artifact its quality gate rejected, unless `force`."""
    if art.manifest.get("rejected") and not force:
        gate = art.manifest.get("quality_gate", {})
        raise ArtifactError(f"model artifact '{art.uri}' was rejected by its quality gate "
                            f"({gate.get('reason', 'no reason recorded')}); load it with force to use it anyway")


def open_runnable(store: Storage, name: str, force: bool = False, kernel: str = "auto") -> tuple[nn.Module, Artifact]:
    """The model artifact `name`, verified and gate-checked, as a module (and the artifact it came from)."""
    art = store.open("model", name, verify=True)
    check_servable(art, force)
    try:
        return load_runnable(art.uri, kernel), art
    except ValueError as e:  # weights that do not fit their description
        raise ArtifactError(f"model artifact '{art.uri}' cannot be loaded: {e}") from None


def load_runnable(uri: str, kernel: str = "auto") -> nn.Module:
    """The model in a model folder (local or cloud URI): float, or quantized with integer weights."""
    fs, path = resolve(uri)
    quantized = fs.get_file_info(f"{path}/{QUANT_CONFIG}").type == pafs.FileType.File
    with fetch_folder(uri, MODEL_FILES + ((QUANT_CONFIG,) if quantized else ())) as folder:
        if json.loads((Path(folder) / "config.json").read_text()).get("model_type") in VISION_TYPES:
            from models.hf_vision import load_vision
            from models.quant_vision import load_int8_vision

            return (load_int8_vision(folder) if quantized else load_vision(folder))[0].eval()
        if quantized:
            return load_quantized(empty_model(folder), folder, kernel)[0]
        return load_inference_model(folder)


def artifact_kind(art: Artifact) -> str:
    """What `model_kind` says of the model an artifact holds, read from its config.json alone."""
    hf = json.loads(art.read_bytes("config.json"))
    if any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in hf.get("architectures") or []):
        return "classify"
    return "lm" if hf.get("model_type") in ("gpt2", *FAMILIES) and not is_headless(hf) else "embed"


def artifact_arch(art: Artifact) -> str:
    """gpt, llama (the Llama family) or encoder (BERT): the architecture an artifact's config.json names."""
    model_type = json.loads(art.read_bytes("config.json")).get("model_type")
    return "gpt" if model_type == "gpt2" else "llama" if model_type in FAMILIES else "encoder"


def model_kind(model: nn.Module) -> str:
    """lm (a GPT or Llama), classify (a SequenceClassifier) or embed (an Encoder, a Llama without LM head)."""
    if isinstance(model, SequenceClassifier):
        return "classify"
    return "lm" if isinstance(model, DecoderLM) and model.has_lm_head else "embed"


def max_len(model: nn.Module) -> int:
    cfg = (model.backbone if isinstance(model, SequenceClassifier) else model).cfg
    return cfg.max_position if isinstance(cfg, EncoderConfig) else cfg.block_size


@torch.no_grad()
def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One inference forward over full rows ids (B, T): logits, class logits or embeddings."""
    if isinstance(model, SequenceClassifier):
        return model(ids, torch.full((ids.size(0),), ids.size(1), dtype=torch.long, device=ids.device))
    if model_kind(model) == "embed":
        return model.embed(ids)
    return model(ids)[0]


def feed(model: nn.Module, sequences: list[np.ndarray]) -> None:
    """Runs the model over each token sequence (calibration)."""
    limit = max_len(model)
    for s in sequences:
        forward(model, torch.from_numpy(np.asarray(s[:limit], dtype=np.int64))[None])
