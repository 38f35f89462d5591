"""Benchmark: jobs.pretrain (Ray Train + DeepSpeed ZeRO-2, 2 workers) against a bare PyTorch loop.

    .venv/bin/python benchmarks/train.py [--steps N] [--out benchmarks/results/train.json]

Measured in one run, same machine, same model (GPT, 4 layers x 256 wide, the
demo dataset's 8192-token vocabulary and 256-token blocks), same global batch
(16 blocks = 4,096 tokens per optimizer step), same AdamW:
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

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=256"]
MICRO, WORKERS = 8, 2  # global batch 16 blocks


def ensure_dataset(storage: str) -> None:
    if not (Path(storage) / "datasets" / "prepare_demo" / "helio.json").exists():
        print("preparing the demo dataset ...", flush=True)
        subprocess.run([sys.executable, "-m", "jobs.prepare", "jobs/configs/prepare_demo.yaml", "--set",
                        f"storage={storage}"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def bare_loop(storage: str, steps: int) -> dict:
    """(a): one process, all cores, no Ray, no DeepSpeed."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cluster.storage import blocks
    from cluster.devices import cpu_matmul_peak
    from cluster.zero import param_groups
    from models.gpt import GPT, GPTConfig

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(storage) / "datasets" / "prepare_demo"
    data = blocks(pq.read_table(sorted((root / "train").glob("*.parquet"))[0], columns=["input_ids"]))
    data = torch.from_numpy(data.astype(np.int64))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256))
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
    peak = cpu_matmul_peak()
    return {"tokens_per_s": tokens_per_s, "mfu": model.flops_per_token(256) * tokens_per_s / peak,
            "peak_flops": peak, "threads": torch.get_num_threads(), "final_loss": loss.item()}


def helio(storage: str, steps: int, gpu: bool) -> dict:
    """(b): the pretrain job itself, on an embedded Ray."""
    name = f"bench_train_{os.getpid()}"
    res = (["resources.use_gpu=true", "resources.num_workers=1", "resources.cpus_per_worker=4",
            "train.micro_batch=16"] if gpu else
           [f"resources.num_workers={WORKERS}", "resources.cpus_per_worker=0.5", f"train.micro_batch={MICRO}"])
    sets = [f"storage={storage}", f"name={name}", "dataset=prepare_demo", *MODEL, f"train.steps={steps}",
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
    parser.add_argument("--storage", default=None, help="where prepare_demo is (made there if missing)")
    parser.add_argument("--gpu", action="store_true", help="run (b) on one GPU in bf16 instead")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or tmp
        ensure_dataset(storage)
        base = None
        if not args.gpu:
            print(f"(a) bare PyTorch loop, {args.steps} steps ...", flush=True)
            base = bare_loop(storage, args.steps)
        print(f"(b) jobs.pretrain, {args.steps} steps ...", flush=True)
        ours = helio(storage, args.steps, args.gpu)
    print(f"\nmodel: GPT 4 x 256, vocab 8192, 256-token blocks; global batch {MICRO * WORKERS} blocks")
    print(f"{'':48} {'tokens/s':>10} {'MFU':>7}")
    if base:
        print(f"{'(a) bare PyTorch, 1 process, ' + str(base['threads']) + ' threads':48} "
              f"{base['tokens_per_s']:10,.0f} {100 * base['mfu']:6.1f}%")
    label = "(b) jobs.pretrain, 1 GPU, bf16" if args.gpu else f"(b) jobs.pretrain, {WORKERS} workers, ZeRO-2"
    mfu = f"{100 * ours['mfu']:6.1f}%" if ours["mfu"] is not None else "    n/a"
    print(f"{label:48} {ours['tokens_per_s']:10,.0f} {mfu}")
    result = {"bare": base, "helio": ours, "target_ratio": 0.9, "target_mfu": 0.5}
    if base:
        result["ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        print(f"(b)/(a) = {result['ratio']:.2f}   target >= 0.90; MFU target >= 50%")
    print(f"(b) wall time with Ray start: {ours['wall_seconds']:.0f} s; peak: {ours['peak_source']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
