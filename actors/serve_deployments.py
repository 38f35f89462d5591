"""The per-model Ray Serve deployments, behind one OpenAI-compatible HTTP ingress.

- Embedder: mean-pooled, L2-normalised sentence embeddings; requests are
  batched (`@serve.batch`) and each batch is cut into length-sorted chunks,
  so a short text is never padded to a long one's length.
- Classifier: label names and probabilities; batched the same way.
- Generator: a causal LM (GPT or Llama, float or quantized) with the KV cache and sampling;
  streams tokens as they are sampled. Concurrent requests share decode steps
  through iteration-level batching (actors/generation_engine.py): a new
  request joins the running batch at the next step.
The HTTP ingress that routes to them is actors/serve_api.py; actors/serve_app.py
binds them into one application.

Heavy state loads in `__init__`; `check_health` makes the model answer a tiny
forward. Models load through `open_runnable`, which verifies the artifact and
refuses one its quality gate rejected unless the config forces it.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator

import torch
import torch.nn.functional as F
from ray import serve

from actors.generation_engine import Engine
from actors.model_loader import open_runnable
from cluster.devices import assigned_device
from cluster.storage import Storage
from models.quant import kernels_used
from models.task_heads import length_mask

CHUNK = 16  # rows per forward inside a batch


def _load(storage: str, artifact: str, force: bool, threads: int) -> torch.nn.Module:
    """The artifact's model, on the replica's GPU when Serve gave it one (`num_gpus`), else on CPU."""
    torch.set_num_threads(max(1, threads))
    model, device = open_runnable(Storage(storage), artifact, force)[0].eval(), assigned_device()
    if device.type == "cuda" and kernels_used(model):
        raise RuntimeError(f"model artifact '{artifact}' is quantized, and Helio has no CUDA integer kernels wired "
                           "in: serve it on CPU replicas (num_gpus: 0)")
    return model.to(device)


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors are: an int8 vision model has no float parameters (its weights are packed),
    and runs on CPU."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded ids (B, T) and lengths (B,), on `device`."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


def _by_length(rows: list[list[int]]) -> list[list[int]]:
    """Indices of `rows` in chunks of similar length (length-aware batching)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i:i + CHUNK] for i in range(0, len(order), CHUNK)]


@torch.no_grad()
def encode(model: torch.nn.Module, rows: list[list[int]], pad_id: int) -> list[list[float]]:
    """Token lists -> L2-normalised mean-pooled embeddings, in length-sorted chunks (what Embedder runs)."""
    out: list[list[float]] = [[] for _ in rows]
    for chunk in _by_length(rows):
        ids, lengths = _padded([rows[i] for i in chunk], pad_id, _device(model))
        vecs = F.normalize(model.embed(ids, length_mask(lengths, ids.size(1))).float(), dim=-1)
        for i, v in zip(chunk, vecs.tolist()):
            out[i] = v
    return out


@serve.deployment
class Embedder:
    def __init__(self, storage: str, artifact: str, force: bool, pad_id: int, threads: int,
                 max_batch_size: int, batch_wait_s: float):
        self.model = _load(storage, artifact, force, threads)
        self.pad_id = pad_id
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def embed(self, rows: list[list[int]]) -> list[list[float]]:
        return encode(self.model, rows, self.pad_id)

    def check_health(self) -> None:
        with torch.no_grad():
            v = self.model.embed(torch.tensor([[self.pad_id + 1, self.pad_id + 2]], device=_device(self.model)))
        if not torch.isfinite(v).all():
            raise RuntimeError("the model's embedding of a probe is not finite")


@serve.deployment
class Classifier:
    def __init__(self, storage: str, artifact: str, force: bool, pad_id: int, threads: int,
                 max_batch_size: int, batch_wait_s: float, labels: list[str]):
        self.model = _load(storage, artifact, force, threads)
        self.pad_id, self.labels = pad_id, labels
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def classify(self, rows: list[list[int]]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{} for _ in rows]
        with torch.no_grad():
            for chunk in _by_length(rows):
                ids, lengths = _padded([rows[i] for i in chunk], self.pad_id, _device(self.model))
                probs = self.model(ids, lengths).float().softmax(-1)
                for i, p in zip(chunk, probs.tolist()):
                    out[i] = dict(zip(self.labels, p))
        return out

    def check_health(self) -> None:
        with torch.no_grad():
            device = _device(self.model)
            p = self.model(torch.tensor([[self.pad_id + 1]], device=device), torch.tensor([1], device=device)).softmax(-1)
        if not torch.isfinite(p).all():
            raise RuntimeError("the classifier's answer to a probe is not finite")


@serve.deployment
class ImageClassifier:
    """A ResNet or ViT (float or int8): each request is one image's uint8 pixels, decoded by the ingress
    (actors/serve_images.py); requests are batched into one forward."""

    def __init__(self, storage: str, artifact: str, force: bool, threads: int, max_batch_size: int,
                 batch_wait_s: float, labels: list[str], size: int, channels: int):
        self.model = _load(storage, artifact, force, threads)
        self.labels, self.shape = labels, (size, size, channels)
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def classify(self, images: list[bytes]) -> list[dict[str, float]]:
        from models.hf_vision import normalize

        pixels = torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8).view(len(images), *self.shape)
        with torch.no_grad():
            probs = self.model(normalize(pixels).to(_device(self.model))).float().softmax(-1)
        return [dict(zip(self.labels, p)) for p in probs.tolist()]

    def check_health(self) -> None:
        from models.hf_vision import normalize

        with torch.no_grad():
            p = self.model(normalize(torch.zeros(1, *self.shape, dtype=torch.uint8)).to(_device(self.model)))
        if not torch.isfinite(p).all():
            raise RuntimeError("the classifier's answer to a blank image is not finite")


@serve.deployment
class Generator:
    def __init__(self, storage: str, artifact: str, force: bool, threads: int, max_batch_size: int,
                 stream_interval_s: float, context: int = 0, draft_tokens: int = 4):
        self.model = _load(storage, artifact, force, threads)
        self.engine = Engine(self.model, max_batch_size, stream_interval_s, context, draft_tokens)

    async def generate(self, ids: list[int], params: dict[str, Any]) -> list[int]:
        return [t async for piece in self.engine.generate(ids, params) for t in piece]

    async def stream(self, ids: list[int], params: dict[str, Any]) -> AsyncIterator[list[int]]:
        """Token ids as they are sampled, in pieces (a streaming handle call)."""
        async for piece in self.engine.generate(ids, params):
            yield piece

    def check_health(self) -> None:
        with torch.no_grad():
            logits, _ = self.model(torch.tensor([[1, 2]], device=_device(self.model)))
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model's logits for a probe are not finite")


async def stream_tokens(handle, ids: list[int], params: dict[str, Any]) -> AsyncIterator[int]:
    async for token in handle.options(stream=True).stream.remote(ids, params):
        yield token


def threads_for(num_cpus: float) -> int:
    return max(1, min(int(round(num_cpus)) or 1, os.cpu_count() or 1))
