"""Benchmark: the prepare job against the bare tokenizer it is built on.

    .venv/bin/python benchmarks/prepare.py [--repeat N] [--out benchmarks/results/prepare.json]

Measured in one run on the same text (this interpreter's stdlib, the demo corpus):
  (a)  `tokenizers` encode_batch in one process on one thread: the ceiling of
       one core doing nothing but tokenizing (RAYON_NUM_THREADS=1);
  (a') the same with all threads, for reference;
  (b)  the whole `jobs.prepare` (read, clean, filter, exact + near dedup, BPE
       training, tokenize, pack, write) on an embedded Ray with 1 CPU;
  (c)  the same with all CPUs.
Job time excludes starting the embedded cluster (reported beside it).
Target: (c) >= 0.7 x (a) x CPUs.
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
CONFIG = ROOT / "jobs" / "configs" / "prepare_demo.yaml"

TOKENIZE = """
import json, os, sys, time
from tokenizers import Tokenizer
from cluster.sources import stdlib_files
tok = Tokenizer.from_file(sys.argv[1])
repeat = int(sys.argv[2])
texts = [open(f, 'rb').read().decode('utf-8', 'replace') for f in stdlib_files()] * repeat
nbytes = sum(len(t.encode()) for t in texts)
best = None
for _ in range(2):
    t = time.perf_counter()
    tok.encode_batch_fast(texts, add_special_tokens=False)
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
print(json.dumps({"bytes": nbytes, "seconds": best}))
"""


def run_job(storage: str, name: str, cpus: int, repeat: int) -> dict:
    corpus = []
    if repeat > 1:
        src = Path(storage) / "corpus"
        sys.path.insert(0, str(ROOT))
        from cluster.sources import stdlib_files

        for r in range(repeat):
            for i, f in enumerate(stdlib_files()):
                dst = src / f"copy{r}" / f"{i:05d}.py"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(Path(f).read_bytes())
        corpus = ["--set", f"source.paths=[{src}]"]
    cmd = [sys.executable, "-m", "jobs.prepare", str(CONFIG), "--set", f"storage={storage}", "--set", f"name={name}",
           "--set", f"local_cpus={cpus}", *corpus]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.perf_counter() - t
    manifest = json.loads((Path(storage) / "datasets" / name / "helio.json").read_text())
    return {"bytes": manifest["metrics"]["bytes_read"], "seconds": manifest["metrics"]["seconds"], "wall_seconds": wall,
            "records": manifest["metrics"]["records"]}


def tokenize(tokenizer: str, threads: int | None, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", TOKENIZE, tokenizer, str(repeat)], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="stdlib copies in the corpus (copies are exact duplicates)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as storage:
        print(f"running the prepare job on all {cpus} CPUs ...", flush=True)
        all_cpus = run_job(storage, "bench_all", cpus, args.repeat)
        print("running the prepare job on 1 CPU ...", flush=True)
        one_cpu = run_job(storage, "bench_one", 1, args.repeat)
        tokenizer = str(Path(storage) / "datasets" / "bench_all" / "tokenizer.json")
        print("timing bare tokenizers encode_batch ...", flush=True)
        single = tokenize(tokenizer, 1, args.repeat)
        threaded = tokenize(tokenizer, None, args.repeat)

    def mbs(r: dict) -> float:
        return r["bytes"] / 1e6 / r["seconds"]

    rows = [
        ("(a)  tokenizers encode_batch, 1 thread", mbs(single), single["seconds"], ""),
        (f"(a') tokenizers encode_batch, {cpus} threads", mbs(threaded), threaded["seconds"], ""),
        ("(b)  helio prepare, 1 CPU", mbs(one_cpu), one_cpu["seconds"], f"{one_cpu['wall_seconds']:.1f}"),
        (f"(c)  helio prepare, {cpus} CPUs", mbs(all_cpus), all_cpus["seconds"], f"{all_cpus['wall_seconds']:.1f}"),
    ]
    target = 0.7 * mbs(single) * cpus
    print(f"\ncorpus: {single['bytes'] / 1e6:.1f} MB (stdlib x{args.repeat}); CPUs: {cpus}")
    print(f"{'':44} {'MB/s':>8} {'seconds':>8} {'wall (with Ray start)':>22}")
    for name, rate, secs, wall in rows:
        print(f"{name:44} {rate:8.2f} {secs:8.1f} {wall:>22}")
    print(f"(c) / ((a) x CPUs) = {mbs(all_cpus) / (mbs(single) * cpus):.2f}   target >= 0.70   "
          f"(c) needs >= {target:.2f} MB/s")
    result = {
        "corpus_mb": single["bytes"] / 1e6, "repeat": args.repeat, "cpus": cpus,
        "tokenizers_1_thread_mb_s": mbs(single), "tokenizers_all_threads_mb_s": mbs(threaded),
        "helio_1_cpu_mb_s": mbs(one_cpu), "helio_all_cpus_mb_s": mbs(all_cpus),
        "helio_1_cpu": one_cpu, "helio_all_cpus": all_cpus,
        "ratio_vs_target": mbs(all_cpus) / (mbs(single) * cpus), "target_ratio": 0.7,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
