"""Benchmark: full vs LoRA finetuning of all-MiniLM-L6-v2 for stdlib docstring <-> code retrieval.

    .venv/bin/python benchmarks/finetune.py [--steps N] [--out benchmarks/results/finetune.json]

Measured in one run, same machine, same model, same data, same global batch,
same steps: `jobs.finetune` with `method: full` (every weight trained: the
baseline) and with `method: lora` (rank-16 adapters on every projection, base
frozen), both 2 Ray Train workers x 0.5 CPU, DeepSpeed ZeRO-2, symmetric
in-batch-negatives loss. Reported per method: training tokens/s (median over
logging intervals after the first, padding not counted), peak memory per worker
(resident set size on CPU, CUDA allocations on a GPU), trainable parameters,
and the held-out retrieval MRR / recall@1 / recall@10 of the base model and of
the finetuned one (530 held-out docstring -> function pairs from modules never
trained on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "jobs/configs/finetune_embed_demo.yaml"


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def finetune(storage: str, method: str, steps: int, gpu: bool) -> dict:
    name = f"bench_{method}_{int(time.time())}"  # a fresh run folder: an existing one would be resumed
    sets = [f"storage={storage}", f"name={name}", f"method={method}", f"train.steps={steps}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=5"]
    if method == "full":
        sets.append("optim.lr=0.00005")  # full finetuning of a pretrained encoder wants a smaller step
    if gpu:
        sets += ["resources.num_workers=1", "resources.use_gpu=true", "resources.cpus_per_worker=4"]
    t = time.perf_counter()
    run(["jobs.finetune", CONFIG] + [x for s in sets for x in ("--set", s)])
    m = json.loads((Path(storage) / "models" / name / "helio.json").read_text())["metrics"]
    return {"method": method, "wall_seconds": time.perf_counter() - t, **m}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--storage", default=None, help="where make_tasks_demo is (made there if missing)")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker in bf16 instead of 2 CPU workers")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or tmp
        if not (Path(storage) / "tasks" / "stdlib_tasks" / "helio.json").exists():
            print("making the stdlib tasks ...", flush=True)
            run(["jobs.make_tasks", "jobs/configs/make_tasks_demo.yaml", "--set", f"storage={storage}"])
        results = {}
        for method in ("full", "lora"):
            print(f"finetuning MiniLM, {method}, {args.steps} steps ...", flush=True)
            results[method] = finetune(storage, method, args.steps, args.gpu)
    full, lora = results["full"], results["lora"]
    print(f"\nall-MiniLM-L6-v2, embed task, {args.steps} steps, global batch 32 pairs (+ hard negatives)")
    print(f"{'':24} {'tokens/s':>10} {'peak MiB/worker':>16} {'trainable':>12} {'MRR':>7} {'R@1':>7} {'R@10':>7}")
    b = full["before"]
    print(f"{'base model (no training)':24} {'':>10} {'':>16} {'':>12} {b['mrr']:7.4f} {b['recall@1']:7.4f} "
          f"{b['recall@10']:7.4f}")
    for label, r in (("full finetune (baseline)", full), ("LoRA r=16 (Helio)", lora)):
        a = r["after"]
        print(f"{label:24} {r['tokens_per_s']:10,.0f} {r['peak_memory_mb_per_worker']:16,.0f} "
              f"{r['trainable_params']:12,} {a['mrr']:7.4f} {a['recall@1']:7.4f} {a['recall@10']:7.4f}")
    ratio = {"tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
             "peak_memory": lora["peak_memory_mb_per_worker"] / full["peak_memory_mb_per_worker"],
             "trainable_params": lora["trainable_params"] / full["trainable_params"]}
    print(f"LoRA / full: tokens/s x{ratio['tokens_per_s']:.2f}, peak memory x{ratio['peak_memory']:.2f}, "
          f"trainable parameters x{ratio['trainable_params']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "full": full, "lora": lora, "lora_over_full": ratio},
                                         indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
