"""jobs.quantize's vision branch: int8 of a ResNet (static, calibrated on held-out images) or a ViT
(dynamic) with PyTorch's x86 flows (models/quant_vision.py), scored against the float model on the
test split of its image dataset (accuracy and macro-F1, the gate), and timed at batch 1 and 32.

Quantization, scoring and timing run in one Ray task (the models are small; the images are read
there, from the dataset's shards); the driver writes the artifact: the int8 tensors, quantization.json,
report.json and the float model's config.json and preprocessor_config.json.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import ray

from cluster.cli import JobFailed, format_summary
from cluster.config import ConfigError, to_dict
from cluster.storage import Artifact, Storage

log = logging.getLogger("helio")
COPIED = ("config.json", "preprocessor_config.json")


def _images(uris: list[str], limit: int | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cluster.storage import blocks, resolve

    tables = []
    for uri in uris:
        fs, path = resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=["pixels", "label"]))
        if limit is not None and sum(len(t) for t in tables) >= limit:
            break
    table = pa.concat_tables(tables).slice(0, limit)
    return torch.from_numpy(blocks(table, "pixels")), torch.from_numpy(blocks(table, "label").astype(np.int64))


def _ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t) / iters


@ray.remote
def quantize_and_score(model_uri: str, calibration_uris: list[str], samples: int, test_uris: list[str],
                       threads: int, iters: int) -> dict[str, Any]:
    import torch
    from actors.image_report import accuracy_and_f1
    from cluster.storage import fetch_folder
    from models.hf_vision import load_vision, normalize
    from models.quant_vision import int8_tensors, quantize_vision

    torch.set_num_threads(threads)
    folder = fetch_folder(model_uri, ("config.json", "model.safetensors"))
    model, labels, size = load_vision(folder.name)
    model.eval()
    view = lambda px: normalize(px.view(-1, size, size, model.cfg.channels))  # noqa: E731
    calib, _ = _images(calibration_uris, samples)
    q, desc = quantize_vision(model, [view(calib[i:i + 64]) for i in range(0, len(calib), 64)])
    pixels, truth = _images(test_uris)
    x = view(pixels)
    scores, latency = {}, {}
    with torch.no_grad():
        for name, m in (("float", model), ("int8", q)):
            predicted = torch.cat([m(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)]).numpy()
            scores[name] = accuracy_and_f1(truth.tolist(), predicted.tolist(), len(labels))
        for batch in (1, 32):
            xb = x[:batch].contiguous()
            latency[f"b{batch}"] = {name: _ms(lambda m=m: m(xb), iters) for name, m in (("float", model), ("int8", q))}
    tensors = {k: v.numpy() for k, v in int8_tensors(q).items()}
    return {"tensors": tensors, "description": desc, "scores": scores, "latency": latency,
            "test_images": len(x), "calibration_images": len(calib)}


def lineage_images(store: Storage, art: Artifact) -> Artifact:
    """The image dataset a vision model was trained or finetuned on (its manifest's parents)."""
    for p in art.manifest.get("parents", []):
        if p.get("kind") == "dataset" and store.exists("dataset", p["name"]):
            ds = store.open("dataset", p["name"], verify=False)
            if "images" in ds.manifest:
                return ds
    raise ConfigError("eval.dataset", f"model '{art.name}' names no image dataset among its parents: set "
                                      f"eval.dataset to one (jobs.prepare_images)")


def run(cfg: Any, store: Storage, parent: Artifact) -> dict[str, Any]:
    """Quantizes, scores, gates and writes the vision artifact; returns its manifest."""
    from safetensors.numpy import save as save_numpy

    if cfg.method != "int8":
        raise ConfigError("method", f"vision models are quantized int8 (static for a ResNet, dynamic for a ViT); "
                                    f"{cfg.method} is for language models")
    data = store.open("dataset", cfg.eval.dataset, verify=False) if cfg.eval.dataset else lineage_images(store, parent)
    if "images" not in data.manifest:
        raise ConfigError("eval.dataset", f"dataset '{data.name}' holds no images")
    splits = data.manifest["images"]["splits"]
    if not splits["test"]["images"] or not splits["val"]["images"]:
        raise ConfigError("eval.dataset", f"dataset '{data.name}' needs a val split (calibration) and a test split")
    calibration = [data.file_uri(f) for f in splits["val"]["shards"]]
    test = [data.file_uri(f) for f in splits["test"]["shards"]]
    e = cfg.eval
    log.info("quantizing '%s' to int8 on a Ray worker: calibrating on %d val images of '%s', scoring on its %d test "
             "images, timing at batch 1 and 32 (%d threads)", parent.name, cfg.calibration.samples, data.name,
             splits["test"]["images"], e.threads)
    done = ray.get(quantize_and_score.options(num_cpus=e.threads).remote(
        parent.uri, calibration, cfg.calibration.samples, test, e.threads, e.iters))
    s, lat = done["scores"], done["latency"]
    drops = {k: (s["float"][k] - s["int8"][k]) / max(s["float"][k], 1e-9) for k in ("accuracy", "macro_f1")}
    worst = max(drops, key=drops.get)
    passed = drops[worst] <= cfg.max_quality_delta
    float_bytes = parent.manifest["files"]["model.safetensors"]["bytes"]
    blob = save_numpy(done["tensors"], metadata={"format": "pt", "helio": "int8-vision"})
    gate = {"metric": worst, "max_delta": cfg.max_quality_delta, "delta": drops[worst], "passed": passed,
            "reason": (f"{worst} dropped by {100 * drops[worst]:.2f}% (relative), over the budget of "
                       f"{100 * cfg.max_quality_delta:.2f}%") if not passed else ""}
    report = {"method": "int8", "quantization": done["description"], "dataset": data.name,
              "test_images": done["test_images"], "calibration_images": done["calibration_images"],
              "quality": {"float": s["float"], "int8": s["int8"], "relative_drop": drops},
              "size": {"float_bytes": float_bytes, "int8_bytes": len(blob), "file_ratio": len(blob) / float_bytes},
              "latency_ms": lat, "latency_ratio": {b: lat[b]["int8"] / lat[b]["float"] for b in lat},
              "threads": e.threads, "gate": gate}
    parents = [{"kind": "model", "name": parent.name, "uri": parent.uri, "created_at": parent.manifest["created_at"]},
               {"kind": "dataset", "name": data.name, "uri": data.uri, "created_at": data.manifest["created_at"]}]
    with store.create("model", cfg.name, to_dict(cfg), parents=parents) as out:
        out.write_bytes("model.safetensors", blob)
        out.write_bytes("quantization.json", json.dumps(done["description"], indent=2).encode())
        out.write_bytes("report.json", json.dumps(report, indent=2).encode())
        for rel in COPIED:
            out.write_bytes(rel, parent.read_bytes(rel))
        out.metrics = {"quality_metric": worst, "quality_float": s["float"][worst], "quality": s["int8"][worst],
                       "quality_delta": drops[worst], "accuracy_float": s["float"]["accuracy"],
                       "accuracy_int8": s["int8"]["accuracy"], "macro_f1_float": s["float"]["macro_f1"],
                       "macro_f1_int8": s["int8"]["macro_f1"], "size_ratio": report["size"]["file_ratio"],
                       "latency_ratio_b1": report["latency_ratio"]["b1"],
                       "latency_ratio_b32": report["latency_ratio"]["b32"]}
        out.extra["quantization"] = {k: v for k, v in done["description"].items() if k != "layers"}
        out.extra["quality_gate"] = gate
        out.extra["rejected"] = not passed
        out.extra["model"] = {"arch": json.loads(parent.read_bytes("config.json"))["model_type"], "kind": "classify",
                              "quantized": True}
    manifest = store.open("model", cfg.name, verify=False).manifest
    print(render(report, cfg.name))
    if not passed:
        raise JobFailed(f"{gate['reason']}; the artifact '{cfg.name}' is written but marked rejected "
                        f"(serving refuses it unless forced)")
    return manifest


def render(r: dict[str, Any], name: str) -> str:
    q, lat = r["quality"], r["latency_ms"]
    rows = [("scheme", f"int8 {r['quantization']['scheme']} ({r['quantization']['engine']}), "
                       f"{r['calibration_images']} calibration images" if r["quantization"]["scheme"] == "static"
             else f"int8 {r['quantization']['scheme']} ({r['quantization']['engine']})"),
            (f"test accuracy, {r['test_images']} images", f"{q['float']['accuracy']:.4f} -> {q['int8']['accuracy']:.4f}"),
            ("test macro F1", f"{q['float']['macro_f1']:.4f} -> {q['int8']['macro_f1']:.4f}"),
            ("file size", f"{r['size']['float_bytes'] / 1e6:.2f} MB -> {r['size']['int8_bytes'] / 1e6:.2f} MB "
                          f"(x{r['size']['file_ratio']:.2f})")]
    rows += [(f"latency, batch {b[1:]} ({r['threads']} thread(s))",
              f"{lat[b]['float']:.2f} ms -> {lat[b]['int8']:.2f} ms (x{lat[b]['int8'] / lat[b]['float']:.2f})")
             for b in ("b1", "b32")]
    g = r["gate"]
    rows.append(("quality gate", f"{'passed' if g['passed'] else 'REJECTED'}: {g['metric']} "
                                 f"{100 * g['delta']:+.2f}% (budget {100 * g['max_delta']:.2f}%)"))
    rows.append(("model artifact", name))
    return format_summary("quantize summary", rows)
