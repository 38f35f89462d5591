"""Benchmark: full vs LoRA finetuning of all-MiniLM-L6-v2 for stdlib docstring <-> code retrieval, and
packed vs unpacked SFT rows and contrastive pairs.

    .venv/bin/python benchmarks/finetune.py [--steps N] [--out benchmarks/results/finetune.json]
    .venv/bin/python benchmarks/finetune.py --packing [--steps N]   # only the packing comparisons

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

Packing (`--packing`, also part of the default run): the demo's SFT (jobs/configs/finetune_sft_demo.yaml:
docstring -> function on the stdlib tasks, max_len 256) on a briefly pretrained demo Llama, with
`data.pack: true` (several examples per row, none attending to another) and `false` (one per row,
each batch trimmed to its longest), same steps and micro-batch: useful (non-padding) tokens/s, and
the rows' padding. Target (issue 19): packed >= 2x the unpacked run's useful tokens/s. The same for
the embedding demo's contrastive pairs (MiniLM LoRA): pairs per row, padding, useful tokens/s and the
held-out MRR after training.
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


def finetune(storage: str, method: str, steps: int, gpu: bool, pack: bool = True) -> dict:
    # a fresh run folder: an existing one would be resumed
    name = f"bench_{method}{'' if pack else '_unpacked'}_{int(time.time())}"
    sets = [f"storage={storage}", f"name={name}", f"method={method}", f"train.steps={steps}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=5",
            f"data.pack={str(pack).lower()}"]
    if method == "full":
        sets.append("optim.lr=0.00005")  # full finetuning of a pretrained encoder wants a smaller step
    if gpu:
        sets += ["resources.num_workers=1", "resources.use_gpu=true", "resources.cpus_per_worker=4"]
    t = time.perf_counter()
    run(["jobs.finetune", CONFIG] + [x for s in sets for x in ("--set", s)])
    m = json.loads((Path(storage) / "models" / name / "helio.json").read_text())["metrics"]
    return {"method": method, "pack": pack, "wall_seconds": time.perf_counter() - t, **m}


def sft(storage: str, pack: bool, steps: int) -> dict:
    name = f"bench_sft_{'packed' if pack else 'unpacked'}_{int(time.time())}"
    sets = [f"storage={storage}", f"name={name}", f"data.pack={str(pack).lower()}", f"train.steps={steps}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=5",
            "eval.max_examples=4", "eval.max_new_tokens=8"]
    t = time.perf_counter()
    run(["jobs.finetune", "jobs/configs/finetune_sft_demo.yaml"] + [x for s in sets for x in ("--set", s)])
    m = json.loads((Path(storage) / "models" / name / "helio.json").read_text())["metrics"]
    return {"pack": pack, "wall_seconds": time.perf_counter() - t, "computed_padding": computed_padding(
        Path(storage) / "runs" / name / "data" / "train.parquet", micro_batch=4), **m}


def computed_padding(rows: Path, micro_batch: int, draws: int = 2000) -> float:
    """The share of the tokens a step computes that are padding, with each micro-batch trimmed to its
    longest row (as the SFT objective trims): the mean over random micro-batches of the training rows."""
    import numpy as np
    import pyarrow.parquet as pq

    lengths = np.asarray(pq.read_table(rows, columns=["length"]).column("length").to_pylist())
    batches = np.random.default_rng(0).choice(lengths, size=(draws, micro_batch))
    return float(1 - batches.sum() / (batches.max(axis=1).sum() * micro_batch))


def packing(storage: str, steps: int) -> dict:
    """Packed against unpacked SFT rows on the stdlib tasks; prints the table, returns the results."""
    if not (Path(storage) / "models" / "pretrain_demo" / "helio.json").exists():
        print("preparing the stdlib dataset and pretraining the demo Llama briefly ...", flush=True)
        run(["jobs.prepare", "jobs/configs/prepare_demo.yaml", "--set", f"storage={storage}"])
        run(["jobs.pretrain", "jobs/configs/pretrain_demo.yaml", "--set", f"storage={storage}",
             "--set", "train.steps=20", "--set", "sample.count=0"])
    out = {}
    for pack in (False, True):
        print(f"SFT of the demo Llama, {'packed' if pack else 'unpacked'} rows, {steps} steps ...", flush=True)
        out["packed" if pack else "unpacked"] = sft(storage, pack, steps)
    plain, packed = out["unpacked"], out["packed"]
    rows = packed["packing"]
    print(f"\ndemo Llama SFT on the stdlib tasks, {steps} steps, micro-batch 4 x 2 workers, max_len 256")
    print(f"{'':18} {'useful tokens/s':>16} {'training rows':>14} {'row padding':>12} {'computed padding':>17} "
          f"{'val loss':>9}")
    for label, r, padding in (("unpacked", plain, rows["padding_unpacked"]),
                              ("packed (Helio)", packed, rows["padding_packed"])):
        print(f"{label:18} {r['tokens_per_s']:16,.0f} {r['train_rows']:14,} {100 * padding:11.1f}% "
              f"{100 * r['computed_padding']:16.1f}% {r['val_loss']:9.4f}")
    out["packed_over_unpacked"] = packed["tokens_per_s"] / plain["tokens_per_s"]
    print(f"packed / unpacked useful tokens/s: x{out['packed_over_unpacked']:.2f} (target >= 2); removing all the "
          f"padding a step computes could give at most x{1 / (1 - plain['computed_padding']):.2f} here")
    return out


def embed_packing(storage: str, steps: int) -> dict:
    """Packed against unpacked contrastive pairs: the embedding demo (MiniLM LoRA), same steps and rows."""
    out = {}
    for pack in (False, True):
        print(f"MiniLM LoRA, {'packed' if pack else 'unpacked'} pairs, {steps} steps ...", flush=True)
        out["packed" if pack else "unpacked"] = finetune(storage, "lora", steps, gpu=False, pack=pack)
    plain, packed = out["unpacked"], out["packed"]
    rows = packed["packing"]
    print(f"\nall-MiniLM-L6-v2 LoRA on the stdlib retrieval pairs, {steps} steps, micro-batch 8 rows x 2 workers")
    print(f"{'':18} {'useful tokens/s':>16} {'pairs / row':>12} {'row padding':>12} {'MRR after':>10}")
    for label, r, padding, per_row in (("unpacked", plain, rows["padding_unpacked"], 1.0),
                                       ("packed (Helio)", packed, rows["padding_packed"],
                                        rows["examples"] / rows["rows"])):
        print(f"{label:18} {r['tokens_per_s']:16,.0f} {per_row:12.2f} {100 * padding:11.1f}% "
              f"{r['after']['mrr']:10.4f}")
    out["packed_over_unpacked"] = packed["tokens_per_s"] / plain["tokens_per_s"]
    print(f"packed / unpacked useful tokens/s: x{out['packed_over_unpacked']:.2f}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--storage", default=None, help="where make_tasks_demo is (made there if missing)")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker in bf16 instead of 2 CPU workers")
    parser.add_argument("--packing", action="store_true", help="only the packed vs unpacked comparisons")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or tmp
        if not (Path(storage) / "tasks" / "stdlib_tasks" / "helio.json").exists():
            print("making the stdlib tasks ...", flush=True)
            run(["jobs.make_tasks", "jobs/configs/make_tasks_demo.yaml", "--set", f"storage={storage}"])
        packed = packing(storage, args.steps)
        packed_pairs = embed_packing(storage, args.steps)
        if args.packing:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"steps": args.steps, "packing": packed,
                                                  "packing_embed": packed_pairs}, indent=2))
            print(f"wrote {args.out}")
            return 0
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
    Path(args.out).write_text(json.dumps({"steps": args.steps, "full": full, "lora": lora, "lora_over_full": ratio,
                                          "packing": packed, "packing_embed": packed_pairs}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
