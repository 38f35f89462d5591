"""Benchmark: jobs.pretrain (Ray Train + DeepSpeed ZeRO-2, 2 workers) against a bare PyTorch loop.

    .venv/bin/python benchmarks/train.py [--steps N] [--out benchmarks/results/train.json]

Measured in one run, same machine, for each architecture (`--arch`): a GPT, 4
layers x 256 wide, and a Llama of the same parameter count (4 layers x 256, 4
query / 2 key-value heads, SwiGLU 768 wide, tied embeddings), the demo
dataset's 8192-token vocabulary and 256-token blocks, the same global batch (16
blocks = 4,096 tokens per optimizer step), the same AdamW:
  (a) a bare single-process PyTorch training loop using all cores (nanoGPT's
      shape: forward, backward, clip, step) on batches already in memory;
  (b) the whole `jobs.pretrain`: 2 Ray Train workers x 1 CPU-share each, each a
      DeepSpeed ZeRO-2 engine, streaming the dataset artifact with Ray Data.
Throughput is the median over logging intervals after the first (warm-up).
MFU = model FLOPs (6N + attention) / the matmul peak measured on the same
threads (cluster/devices.py). Target: (b)/(a) >= 0.9 and MFU >= 50%.
On a GPU (`--gpu`), only (b) runs, bf16, with MFU against the datasheet peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # the same parameters per layer (786,432 weights, biases aside) and the same tied embeddings
    # pretrain_demo.yaml is a Llama: its Llama-only keys back to their defaults (GPT-2 ties its head anyway)
    "gpt": ["model.arch=gpt", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.n_kv_head=0",
            "model.tie_embeddings=false"],
    "llama": ["model.arch=llama", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=256",
              "model.intermediate_size=768", "model.tie_embeddings=true"],
}
MICRO, WORKERS = 8, 2  # global batch 16 blocks


def ensure_dataset(storage: str) -> None:
    if not (Path(storage) / "datasets" / "prepare_demo" / "helio.json").exists():
        print("preparing the demo dataset ...", flush=True)
        subprocess.run([sys.executable, "-m", "jobs.prepare", "jobs/configs/prepare_demo.yaml", "--set",
                        f"storage={storage}"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def bare_loop(storage: str, steps: int, arch: str) -> dict:
    """(a): one process, all cores, no Ray, no DeepSpeed."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cluster.storage import blocks
    from cluster.devices import cpu_peak
    from cluster.config import load_config
    from cluster.zero import param_groups
    from models.arch import ModelConfig, build_model

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(storage) / "datasets" / "prepare_demo"
    data = blocks(pq.read_table(sorted((root / "train").glob("*.parquet"))[0], columns=["input_ids"]))
    data = torch.from_numpy(data.astype(np.int64))
    torch.manual_seed(0)
    sizes = load_config(ModelConfig, None, [o.removeprefix("model.") for o in MODELS[arch]])
    model = build_model(sizes, vocab_size=8192, seq_len=256)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    rows = MICRO * WORKERS
    times = []
    for step in range(steps + 3):
        batch = data[(step * rows) % (len(data) - rows):][:rows]
        t = time.perf_counter()
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - t)
    tokens_per_s = rows * 256 / float(np.median(times))
    peak, _ = cpu_peak()  # this node's, cached: the job's workers divide by the same kind of number
    return {"tokens_per_s": tokens_per_s, "mfu": model.flops_per_token(256) * tokens_per_s / peak,
            "peak_flops": peak, "threads": torch.get_num_threads(), "final_loss": loss.item(),
            "parameters": sum(p.numel() for p in model.parameters())}


def helio(storage: str, steps: int, gpu: bool, arch: str) -> dict:
    """(b): the pretrain job itself, on an embedded Ray."""
    name = f"bench_train_{arch}_{os.getpid()}"
    res = (["resources.use_gpu=true", "resources.num_workers=1", "resources.cpus_per_worker=4",
            "train.micro_batch=16"] if gpu else
           [f"resources.num_workers={WORKERS}", "resources.cpus_per_worker=0.5", f"train.micro_batch={MICRO}"])
    sets = [f"storage={storage}", f"name={name}", "dataset=prepare_demo", *MODELS[arch], f"train.steps={steps}",
            "train.log_every=10", f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "zero.stage=2",
            "sample.count=0", *res]
    cmd = [sys.executable, "-m", "jobs.pretrain", "jobs/configs/pretrain_demo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.perf_counter() - t
    m = json.loads((Path(storage) / "models" / name / "helio.json").read_text())["metrics"]
    records = [json.loads(x) for x in (Path(storage) / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": m["tokens_per_s"], "mfu": m["mfu"], "wall_seconds": wall, "job_seconds": m["seconds"],
            "peak_source": records[-1]["peak_source"], "val_loss": m["val_loss"],
            "intervals": [{k: r[k] for k in ("step", "tokens_per_s", "mfu")} for r in records]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--arch", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--storage", default=None, help="where prepare_demo is (made there if missing)")
    parser.add_argument("--gpu", action="store_true", help="run (b) on one GPU in bf16 instead")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args()
    archs = list(MODELS) if args.arch == "all" else [args.arch]
    result: dict = {"target_ratio": 0.9, "target_mfu": 0.5, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or tmp
        ensure_dataset(storage)
        for arch in archs:
            base = None
            if not args.gpu:
                print(f"{arch}: (a) bare PyTorch loop, {args.steps} steps ...", flush=True)
                base = bare_loop(storage, args.steps, arch)
            print(f"{arch}: (b) jobs.pretrain, {args.steps} steps ...", flush=True)
            result["archs"][arch] = {"bare": base, "helio": helio(storage, args.steps, args.gpu, arch)}
    print(f"\nvocab 8192, 256-token blocks; global batch {MICRO * WORKERS} blocks")
    print(f"{'':58} {'params':>7} {'tokens/s':>10} {'MFU':>7} {'(b)/(a)':>8}")
    for arch, r in result["archs"].items():
        base, ours = r["bare"], r["helio"]
        size = f"{base['parameters'] / 1e6:6.2f}M" if base else ""
        if base:
            print(f"{arch + ' (a) bare PyTorch, 1 process, ' + str(base['threads']) + ' threads':58} {size:>7} "
                  f"{base['tokens_per_s']:10,.0f} {100 * base['mfu']:6.1f}%")
            r["ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        label = f"{arch} (b) jobs.pretrain, " + ("1 GPU, bf16" if args.gpu else f"{WORKERS} workers, ZeRO-2")
        mfu = f"{100 * ours['mfu']:6.1f}%" if ours["mfu"] is not None else "    n/a"
        ratio = f"{r['ratio']:8.2f}" if base else ""
        print(f"{label:58} {size:>7} {ours['tokens_per_s']:10,.0f} {mfu} {ratio}")
    print("targets: (b)/(a) >= 0.90; MFU >= 50%")
    for arch, r in result["archs"].items():
        print(f"{arch} (b) wall time with Ray start: {r['helio']['wall_seconds']:.0f} s; peak: {r['helio']['peak_source']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
