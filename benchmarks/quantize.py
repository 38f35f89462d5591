"""Benchmark: Helio's int8 / int4 / w8a8 / awq against fp32 and against PyTorch's and torchao's int8.

    .venv/bin/python benchmarks/quantize.py [--storage ./runs] [--models finetune_embed_demo,pretrain_demo]

One run, one model at a time, every variant of it measured the same way:
- Helio's methods are made by `jobs.quantize` (its report gives the quality
  delta against the float model, scored by the job's parallel tasks);
- the peers are built in this process from the same float model: PyTorch's
  built-in dynamic quantization (`torch.ao.quantization.quantize_dynamic`,
  int8 Linear on fbgemm, activations per tensor) and torchao's int8
  weight-only (`Int8WeightOnlyConfig`), scored on the same held-out data by
  the same code (`actors.quantize.score`);
- size is the serialized state dict (`torch.save`) of each variant;
- latency of every variant is timed in this one process by one harness
  (`actors.quantize.latency`: median forward at batch 1 and 16, GPT decode
  tokens/s), alternating between variants.

Models: `finetune_embed_demo` (all-MiniLM-L6-v2 finetuned on stdlib
retrieval: MRR and cosine to the float embeddings) and `pretrain_demo` (the
demo GPT: validation perplexity). A model missing from `--storage` is made
first with the shipped demo configs (a few minutes each on 2 CPUs).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ("int8", "w8a8", "int4", "awq")
MAKE = {
    "finetune_embed_demo": [["jobs.make_tasks", "jobs/configs/make_tasks_demo.yaml"],
                            ["jobs.finetune", "jobs/configs/finetune_embed_demo.yaml"]],
    "pretrain_demo": [["jobs.prepare", "jobs/configs/prepare_demo.yaml"],
                      ["jobs.pretrain", "jobs/configs/pretrain_demo.yaml", "--set", "sample.count=0"]],
}


def job(args: list[str], storage: str) -> None:
    subprocess.run([sys.executable, "-m", *args, "--set", f"storage={storage}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serialized_mb(model) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def peers(float_model) -> dict:
    from torch.ao.quantization import quantize_dynamic
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch.ao dynamic int8"] = quantize_dynamic(copy.deepcopy(float_model), {torch.nn.Linear},
                                                        dtype=torch.qint8)
    ao = copy.deepcopy(float_model)
    quantize_(ao, Int8WeightOnlyConfig())
    out["torchao int8 weight-only"] = ao
    return out


def bench_model(storage: str, name: str, args) -> dict:
    from actors.model_loader import artifact_kind, load_runnable
    from actors.quantize import latency, score
    from cluster.config import load_config
    from cluster.storage import Storage
    from jobs import quantize

    store = Storage(storage)
    if not store.exists("model", name):
        print(f"making {name} (not in {storage}) ...", flush=True)
        for step in MAKE[name]:
            job(step, storage)
    parent = store.open("model", name)
    kind = artifact_kind(parent)
    float_model = load_runnable(parent.uri)
    variants, reports = {"fp32": float_model}, {}
    for method in METHODS:
        qname = f"bench_{name}_{method}"
        print(f"jobs.quantize {name} -> {method} ...", flush=True)
        job(["jobs.quantize", "jobs/configs/quantize_demo.yaml", "--set", f"model={name}", "--set", f"name={qname}",
             "--set", f"method={method}", "--set", "max_quality_delta=1.0", "--set",
             f"eval.max_examples={args.examples}"], storage)
        art = store.open("model", qname)
        reports[method] = json.loads(art.read_bytes("report.json"))
        variants[f"helio {method}"] = load_runnable(art.uri)
    import ray  # the held-out data, read as the job reads it (Ray Data), after the jobs' own clusters are gone

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(quantize.QuantizeConfig, None, [f"storage={storage}", f"model={name}",
                                                          f"eval.max_examples={args.examples}"])
        data, source = quantize.eval_data(cfg, store, parent, kind)
    finally:
        ray.shutdown()
    variants |= peers(float_model)
    fp32_scores = score(float_model, data)
    quality = {"fp32": {"metric": reports["int8"]["quality"]["metric"], "value": reports["int8"]["quality"]["float"],
                        "delta": 0.0}}
    for label, model in variants.items():
        if label.startswith("helio "):
            q = reports[label.removeprefix("helio ")]["quality"]
        elif label != "fp32":
            q = quantize.quality(kind, data, [fp32_scores], [score(model, data)],
                                 len(json.loads(parent.read_bytes("config.json")).get("id2label") or {}))
        else:
            continue
        quality[label] = {"metric": q["metric"], "value": q["quantized"], "delta": q["delta"]}
    print(f"timing {len(variants)} variants of {name} in one process ({args.threads} threads) ...", flush=True)
    torch.set_num_threads(args.threads)
    timing = latency(variants, args.seq_len, args.iters, args.decode_tokens)
    sizes = {label: serialized_mb(m) for label, m in variants.items()}
    rows = []
    for label in variants:
        t, f = timing[label], timing["fp32"]
        rows.append({"variant": label, "size_mb": sizes[label], "size_ratio": sizes[label] / sizes["fp32"],
                     **{f"quality_{k}": v for k, v in quality[label].items()},
                     "latency_ms_b1": t["latency_ms_b1"], "ratio_b1": t["latency_ms_b1"] / f["latency_ms_b1"],
                     "latency_ms_b16": t["latency_ms_b16"], "ratio_b16": t["latency_ms_b16"] / f["latency_ms_b16"],
                     "decode_tokens_per_s": t.get("decode_tokens_per_s")})
    linear = {m: r["size"]["linear_ratio"] for m, r in reports.items()}
    return {"model": name, "kind": kind, "data": source, "seq_len": timing["seq_len"], "threads": args.threads,
            "rows": rows, "helio_linear_size_ratio": linear}


def print_table(result: dict) -> None:
    metric = result["rows"][0]["quality_metric"]
    print(f"\n{result['model']} ({result['kind']}), quality: {metric} on {result['data']}; latency: "
          f"{result['seq_len']} tokens per sequence, {result['threads']} threads, median")
    decode = result["kind"] == "lm"
    head = f"{'variant':26} {'MB':>7} {'x fp32':>7} {metric:>11} {'delta':>8} {'b1 ms':>8} {'x fp32':>7} " \
           f"{'b16 ms':>8} {'x fp32':>7}" + (f" {'decode tok/s':>13}" if decode else "")
    print(head)
    for r in result["rows"]:
        line = (f"{r['variant']:26} {r['size_mb']:7.2f} {r['size_ratio']:7.3f} {r['quality_value']:11.4f} "
                f"{r['quality_delta']:+8.2%} {r['latency_ms_b1']:8.2f} {r['ratio_b1']:7.3f} {r['latency_ms_b16']:8.2f} "
                f"{r['ratio_b16']:7.3f}")
        print(line + (f" {r['decode_tokens_per_s']:13.1f}" if decode else ""))
    print("Helio quantized-layer bytes / fp32: " + ", ".join(f"{m} {v:.3f}" for m, v in result["helio_linear_size_ratio"].items()))
    by = {r["variant"]: r for r in result["rows"]}
    checks = [("int8 quality delta <= 1%", by["helio int8"]["quality_delta"] <= 0.01),
              ("awq quality delta <= 5%", by["helio awq"]["quality_delta"] <= 0.05),
              ("awq beats int4", by["helio awq"]["quality_delta"] < by["helio int4"]["quality_delta"]),
              ("int8 latency <= 0.5 x fp32 (b1, b16)", max(by["helio int8"]["ratio_b1"], by["helio int8"]["ratio_b16"]) <= 0.5),
              ("w8a8 latency <= 0.5 x fp32 (b1, b16)", max(by["helio w8a8"]["ratio_b1"], by["helio w8a8"]["ratio_b16"]) <= 0.5)]
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
    result["targets"] = {name: ok for name, ok in checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=str(ROOT / "runs"), help="where the demo artifacts are (made if missing)")
    parser.add_argument("--models", default="finetune_embed_demo,pretrain_demo")
    parser.add_argument("--examples", type=int, default=256, help="held-out rows or blocks scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize.json"))
    args = parser.parse_args()
    t = time.perf_counter()
    results = []
    for name in args.models.split(","):
        results.append(bench_model(args.storage, name, args))
        print_table(results[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seconds": time.perf_counter() - t, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
