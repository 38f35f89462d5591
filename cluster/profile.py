"""Where a training step's time goes: `torch.profiler` over a few steps, written as a per-step op table.

Set `HELIO_PROFILE_DIR` (a local folder) and rank 0 of a training run records `STEPS` steps after
skipping `SKIP` of its attempt's first ones (warm-up), everything between two steps included: data,
reporting, collectives. It writes `profile.json` (milliseconds per step of each op, self time, and of
the whole window) and `profile.txt` (PyTorch's own table). benchmarks/train.py profiles its bare
PyTorch loop the same way and prints the two side by side.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

SKIP, STEPS = 5, 5
ENV = "HELIO_PROFILE_DIR"


def op_table(prof: torch.profiler.profile, steps: int, seconds: float) -> dict:
    """Self CPU milliseconds per step of each op the profiler saw, largest first, and the window's."""
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return {"steps": steps, "ms_per_step": 1e3 * seconds / steps,
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def write(folder: Path, prof: torch.profiler.profile, steps: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.json").write_text(json.dumps(op_table(prof, steps, seconds), indent=1))
    (folder / "profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


class StepProfile:
    """Call `tick(step)` at the top of every step (the step about to run): it starts the profiler
    before step `start + SKIP` and writes the table when step `start + SKIP + STEPS` is reached (or
    at `close`). A no-op unless `HELIO_PROFILE_DIR` is set, and on every rank but 0."""

    def __init__(self, rank: int, start_step: int):
        folder = os.environ.get(ENV)
        self.folder = Path(folder) if folder and rank == 0 else None
        self.first, self.last = start_step + SKIP, start_step + SKIP + STEPS
        self.prof: torch.profiler.profile | None = None
        self.t0 = 0.0

    def tick(self, step: int) -> None:
        if self.folder is None:
            return
        if step == self.first and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.last:
            self.close(step)

    def close(self, step: int) -> None:
        if self.prof is not None:
            seconds = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            write(self.folder, self.prof, max(1, step - self.first), seconds)
            self.prof = None
