"""Benchmark: what a ray.train.report costs a worker, at Ray Train's default poll and at Helio's.

    .venv/bin/python benchmarks/train_reports.py [--reports N] [--out benchmarks/results/train_reports.json]

Ray Train's controller collects each worker's report when it polls the workers
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a worker's next report
waits until its last was collected. Measured in one run: 2 Ray Train workers x
0.5 CPU on an embedded cluster, each making N reports with nothing between
them, (a) at Ray's default poll and (b) at the poll Helio's jobs set for their
runs (actors/train_driver.py POLL_S). Reported: seconds for the N reports on
the worker, and for the whole `fit`. Target: (b) at most 1/5 of (a).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reports(config: dict) -> None:
    import ray.train

    t0 = time.perf_counter()
    for i in range(config["n"]):
        ray.train.report({"i": i})
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(str(time.perf_counter() - t0))


def measure(n: int, poll_s: float | None, folder: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.train_driver import POLL_ENV
    from cluster.runtime import scoped_environ

    out = Path(folder) / f"seconds-{poll_s}.txt"
    env = {} if poll_s is None else {POLL_ENV: str(poll_s)}
    t0 = time.perf_counter()
    with scoped_environ(env):
        TorchTrainer(reports, train_loop_config={"n": n, "out": str(out)},
                     scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     run_config=ray.train.RunConfig(name=f"reports-{poll_s}", storage_path=folder)).fit()
    return {"poll_s": poll_s if poll_s is not None else 2.0, "reports": n,
            "report_seconds": round(float(out.read_text()), 2), "fit_seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_reports.json"))
    args = parser.parse_args()

    import ray

    from actors.train_driver import POLL_S

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as folder:
            rows = {"ray_default": measure(args.reports, None, folder), "helio": measure(args.reports, POLL_S, folder)}
    finally:
        ray.shutdown()
    ratio = rows["helio"]["report_seconds"] / max(rows["ray_default"]["report_seconds"], 1e-9)
    print(f"{'poll':<22}{'poll s':>8}{'reports':>9}{'report s':>10}{'fit s':>8}")
    for label, r in rows.items():
        print(f"{label:<22}{r['poll_s']:>8.2f}{r['reports']:>9}{r['report_seconds']:>10.2f}{r['fit_seconds']:>8.2f}")
    print(f"helio / ray default (report seconds): {ratio:.3f}  (target <= 0.2: {'met' if ratio <= 0.2 else 'NOT met'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
