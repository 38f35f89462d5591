"""The quantization job's work on the cluster: quantize on a worker, score float and quantized models
shard by shard in parallel, and time both in one process.

Each function is a Ray task; the job (jobs/quantize.py) fans them out and
combines what they return. Models travel as artifact URIs, data as arrays.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from actors.model_loader import feed, forward, load_runnable, max_len, model_kind
from cluster.storage import resolve, sha256_file
from models.quant import QuantSpec, kernels_used, layer_bytes, quantize_model, save_quantized
from models.task_heads import embed, trim


def _threads(n: int) -> None:
    torch.set_num_threads(max(1, min(int(n), os.cpu_count() or 1)))


@ray.remote(num_cpus=1)
def quantize_remote(model_uri: str, spec: dict, kernel: str, calibration: list[np.ndarray] | None,
                    out_uri: str) -> dict:
    """Quantizes the model at `model_uri` and writes model.safetensors + quantization.json into `out_uri`.

    Returns the description, the files written ({name: {sha256, bytes}}), the
    quantized layers' bytes before and after, and the kernels the layers run on.
    """
    _threads(1)
    t = time.perf_counter()
    model = load_runnable(model_uri)
    run = (lambda m: feed(m, calibration)) if calibration else None
    qmodel, description = quantize_model(model, QuantSpec(**spec), run, kernel)
    names = list(description["layers"])
    fs, path = resolve(out_uri)
    files = {}
    with tempfile.TemporaryDirectory(prefix="helio-quant-") as local:
        for name in save_quantized(qmodel, description, local):
            with open(Path(local) / name, "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
                dst.write(src.read())
            digest, size = sha256_file(fs, f"{path}/{name}")
            files[name] = {"sha256": digest, "bytes": size}
    return {"description": description, "files": files, "seconds": time.perf_counter() - t,
            "layer_bytes": {"float": layer_bytes(model, names), "quantized": layer_bytes(qmodel, names)}}


@ray.remote(num_cpus=1)
def score_shard(model_uri: str, kernel: str, data: dict[str, np.ndarray]) -> dict:
    """`score` of one model on one shard of the held-out data, in a task of its own."""
    _threads(1)
    return score(load_runnable(model_uri, kernel), data)


@torch.no_grad()
def score(model: torch.nn.Module, data: dict[str, np.ndarray], batch: int = 16) -> dict:
    """What held-out data says of a model, in sums the job can add up across shards:

    lm: next-token negative log-likelihood and token count over `blocks`;
    classify: predicted labels of `input_ids`/`length` rows;
    embed: unit embeddings of `query_ids`/`pos_ids` rows, or of whole `blocks`.
    """
    kind, limit = model_kind(model), max_len(model)
    rows = {k: torch.from_numpy(v.astype(np.int64)) for k, v in data.items()}
    n = len(next(iter(rows.values())))
    chunks = [{k: v[i:i + batch] for k, v in rows.items()} for i in range(0, n, batch)]
    if kind == "lm":
        nll, count = 0.0, 0
        for c in chunks:
            x = c["blocks"][:, :limit + 1]
            logits = forward(model, x[:, :-1])  # (B, T, V)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += x[:, 1:].numel()
        return {"nll": nll, "tokens": count}
    if kind == "classify":
        pred = [model(trim(c["input_ids"], c["length"]), c["length"]).argmax(-1) for c in chunks]
        return {"pred": torch.cat(pred).numpy()}
    if "blocks" in rows:
        return {"emb": torch.cat([F.normalize(forward(model, c["blocks"][:, :limit]).float(), dim=-1)
                                  for c in chunks]).numpy()}
    out = {}
    for side in ("query", "pos"):
        out[side] = torch.cat([embed(model, trim(c[f"{side}_ids"], c[f"{side}_len"]), c[f"{side}_len"])
                               for c in chunks]).numpy()
    return out


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


@ray.remote
def time_models(float_uri: str, quant_uri: str, kernel: str, seq_len: int, iters: int, threads: int,
                decode_tokens: int) -> dict:
    """`latency` of the float and the quantized model in one task of `threads` CPUs."""
    _threads(threads)
    models = {"float": load_runnable(float_uri), "quantized": load_runnable(quant_uri, kernel)}
    return latency(models, seq_len, iters, decode_tokens) | {"threads": threads,
                                                            "kernels": kernels_used(models["quantized"])}


@torch.no_grad()
def latency(models: dict[str, torch.nn.Module], seq_len: int, iters: int, decode_tokens: int) -> dict:
    """Median forward latency at batch 1 and 16 (and GPT decode tokens/s at batch 1) of each model,
    measured in this process, alternating between the models so that all see the same machine."""
    first = next(iter(models.values()))
    T = min(seq_len, max_len(first))
    g = torch.Generator().manual_seed(0)
    vocab = 100  # ids every tokenizer has; latency does not depend on which
    out: dict[str, dict] = {name: {} for name in models}
    for batch in (1, 16):
        ids = torch.randint(3, vocab, (batch, T), generator=g)
        for name, m in models.items():  # warm-up: packing, dequantizing, allocator
            forward(m, ids)
        for _ in range(iters):
            for name, m in models.items():
                out[name].setdefault(f"latency_ms_b{batch}", []).append(_ms(lambda: forward(m, ids)))
    result = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in out.items()}
    if model_kind(first) == "lm":
        prompt = torch.randint(3, vocab, (1, min(16, T // 2)), generator=g)
        steps = min(decode_tokens, max_len(first) - prompt.size(1))
        for name, m in models.items():
            m.generate(prompt, 2, temperature=0.0)  # warm-up
            seconds = statistics.median(_ms(lambda: m.generate(prompt, steps, temperature=0.0)) / 1e3
                                        for _ in range(3))
            result[name]["decode_tokens_per_s"] = steps / seconds
    result["seq_len"] = T
    return result
