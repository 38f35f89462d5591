"""Benchmark: the prepare job against the bare tokenizer it is built on, on a real corpus.

    .venv/bin/python benchmarks/prepare.py [--corpus site-packages|stdlib] [--fractions 0.5,1]
                                           [--one-cpu] [--out benchmarks/results/prepare.json]

The corpus (`site-packages`, the default) is every .py, .md, .rst and .txt file
of this environment's site-packages (about 400 MB in Helio's .venv); `stdlib`
is the demo corpus (about 30 MB). Each fraction in `--fractions` is a fixed
subset of its files (chosen by a hash of the path), copied to a scratch
folder, so two sizes of the same kind of text can be compared.

Measured in one run, for each size, on the same text:
  (a) `tokenizers` encode_batch in one process on one thread, with the
      tokenizer the job trained: the ceiling of one core doing nothing but
      tokenizing (RAYON_NUM_THREADS=1);
  (b) the whole `jobs.prepare` (read, clean, filter, exact + near dedup, BPE
      training, tokenize, pack, write) on an embedded Ray with 1 CPU (only
      with --one-cpu: it takes as long as (a) and more);
  (c) the same with all CPUs: its time by stage (the job's manifest), and the
      peak resident memory (VmHWM) of the driver and of the largest Ray
      worker, sampled from /proc while it runs.
Job time excludes starting the embedded cluster (reported beside it).
Target: (c) >= 0.7 x (a) x CPUs, and peak memory that does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "prepare_demo.yaml"
EXTENSIONS = (".py", ".md", ".rst", ".txt")

TOKENIZE = """
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [p.read_bytes().decode('utf-8', 'replace') for p in sorted(Path(sys.argv[2]).rglob('*')) if p.is_file()]
nbytes = sum(len(t.encode()) for t in texts)
seconds = 0.0
for i in range(0, len(texts), 512):  # in batches, so the encodings of the whole corpus are never held at once
    t = time.perf_counter()
    tok.encode_batch_fast(texts[i:i + 512], add_special_tokens=False)
    seconds += time.perf_counter() - t
print(json.dumps({"bytes": nbytes, "seconds": seconds}))
"""


def corpus_files(kind: str) -> tuple[Path, list[Path]]:
    """(root, files under it) of a corpus kind."""
    if kind == "stdlib":
        sys.path.insert(0, str(ROOT))
        from cluster.sources import stdlib_files

        root = Path(sysconfig.get_paths()["stdlib"])
        return root, [Path(f) for f in stdlib_files()]
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*") if p.suffix in EXTENSIONS and p.is_file() and not p.is_symlink())
    return root, files


def make_corpus(kind: str, fraction: float, dest: Path) -> int:
    """Copies a fixed `fraction` of the corpus's files to `dest`; returns the bytes copied."""
    root, files = corpus_files(kind)
    total = 0
    for f in files:
        rel = f.relative_to(root)
        if zlib.crc32(str(rel).encode()) % 10_000 >= fraction * 10_000:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
        total += f.stat().st_size
    return total


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size (VmHWM) of a live process, in MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryWatch:
    """Samples the peak RSS of a process and of every Ray worker (`ray::...`) below it."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.driver, self.workers, self.titles = psutil.Process(pid), 0.0, {}, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.done.wait(0.25):
            try:
                self.driver = max(self.driver, peak_rss_mb(self.proc.pid))
                for child in self.proc.children(recursive=True):
                    title = child.cmdline()[:1]
                    if title and title[0].startswith("ray::"):
                        self.workers[child.pid] = max(self.workers.get(child.pid, 0.0), peak_rss_mb(child.pid))
                        if title[0] != "ray::IDLE":  # what the process is (a worker idles between tasks)
                            self.titles[child.pid] = title[0].split(".")[0]
            except psutil.Error:
                continue

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        top = max(self.workers, key=self.workers.get, default=None)
        return {"driver_peak_rss_mb": round(self.driver, 1),
                "worker_peak_rss_mb": round(self.workers.get(top, 0.0), 1),
                "worker_peak_is": self.titles.get(top, "ray::IDLE"), "workers_seen": len(self.workers)}


def run_job(storage: str, name: str, cpus: int, corpus: Path) -> dict:
    cmd = [sys.executable, "-m", "jobs.prepare", str(CONFIG), "--set", f"storage={storage}", "--set", f"name={name}",
           "--set", f"local_cpus={cpus}", "--set", f"source.paths=[{corpus}]"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    watch = MemoryWatch(proc.pid)
    _, err = proc.communicate()
    memory = watch.stop()
    if proc.returncode:
        sys.exit(f"the prepare job failed (exit {proc.returncode}):\n{err[-3000:]}")
    wall = time.perf_counter() - t
    m = json.loads((Path(storage) / "datasets" / name / "helio.json").read_text())["metrics"]
    return {"bytes": m["bytes_read"], "seconds": m["seconds"], "wall_seconds": wall, "records": m["records"],
            "stage_seconds": m["stage_seconds"], **memory}


def tokenize(tokenizer: str, corpus: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", TOKENIZE, tokenizer, str(corpus)], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(kind: str, fraction: float, cpus: int, one_cpu: bool, scratch: Path) -> dict:
    corpus = scratch / f"corpus-{fraction}"
    size = make_corpus(kind, fraction, corpus)
    print(f"\n{kind} x {fraction}: {size / 1e6:.1f} MB in {sum(1 for p in corpus.rglob('*') if p.is_file()):,} files",
          flush=True)
    storage = str(scratch / "runs")
    print(f"  the prepare job on all {cpus} CPUs ...", flush=True)
    all_cpus = run_job(storage, f"all_{fraction}", cpus, corpus)
    one = None
    if one_cpu:
        print("  the prepare job on 1 CPU ...", flush=True)
        one = run_job(storage, f"one_{fraction}", 1, corpus)
    print("  bare tokenizers encode_batch, 1 thread ...", flush=True)
    single = tokenize(str(Path(storage) / "datasets" / f"all_{fraction}" / "tokenizer.json"), corpus)
    shutil.rmtree(corpus)
    return {"corpus": kind, "fraction": fraction, "corpus_mb": size / 1e6, "tokenizers_1_thread": single,
            "helio_1_cpu": one, "helio_all_cpus": all_cpus}


def mbs(r: dict) -> float:
    return r["bytes"] / 1e6 / r["seconds"]


def report(rows: list[dict], cpus: int) -> None:
    print(f"\nCPUs: {cpus}. MB/s of input read; job seconds exclude the embedded Ray's start (wall includes it).")
    print(f"{'corpus':>18} {'(a) tok 1 thr':>14} {'(b) helio 1 CPU':>16} {f'(c) helio {cpus} CPUs':>18} "
          f"{'(c)/((a)x' + str(cpus) + ')':>12} {'driver MB':>10} {'worker MB':>10}")
    for r in rows:
        a, b, c = r["tokenizers_1_thread"], r["helio_1_cpu"], r["helio_all_cpus"]
        r["ratio"] = mbs(c) / (mbs(a) * cpus)
        print(f"{r['corpus_mb']:15.1f} MB {mbs(a):14.2f} {(f'{mbs(b):.2f}' if b else '-'):>16} {mbs(c):18.2f} "
              f"{r['ratio']:12.2f} {c['driver_peak_rss_mb']:10.0f} {c['worker_peak_rss_mb']:10.0f}")
    print("\n(c) by stage, seconds (job / wall with Ray start):")
    for r in rows:
        c = r["helio_all_cpus"]
        stages = "  ".join(f"{k} {v:.1f}" for k, v in c["stage_seconds"].items())
        print(f"{r['corpus_mb']:15.1f} MB  {stages}  commit {c['seconds'] - sum(c['stage_seconds'].values()):.1f}"
              f"  = {c['seconds']:.1f} / {c['wall_seconds']:.1f}")
    print("largest worker: " + ", ".join(f"{r['corpus_mb']:.0f} MB: {r['helio_all_cpus']['worker_peak_is']}" for r in rows))
    print("target: (c)/((a) x CPUs) >= 0.70, and peak memory flat across corpus sizes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("site-packages", "stdlib"), default="site-packages")
    parser.add_argument("--fractions", default="0.5,1", help="comma-separated fractions of the corpus's files")
    parser.add_argument("--one-cpu", action="store_true", help="also run the job on 1 CPU (b)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"--fractions: each must be in (0, 1], got {args.fractions}")
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(args.corpus, f, cpus, args.one_cpu, Path(scratch)) for f in fractions]
    report(rows, cpus)
    result = {"cpus": cpus, "target_ratio": 0.7, "sizes": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
