"""What a training run tells its user: a progress line per report, metrics.jsonl, a loss curve.

`Progress` is a Ray Train callback: it runs in the train controller (whose
output Ray forwards to the driver) and sees every report after all workers
made it. It keeps `metrics.jsonl` in the run folder, rewritten atomically on
each report; a report for a step at or before one already written (the run
resumed from an earlier checkpoint) replaces the later records, so no step is
ever counted twice.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from typing import Any

from ray.train.v2.api.callback import UserCallback

from cluster.storage import resolve, write_file_atomic

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    fs, path = resolve(run_uri)
    try:
        with fs.open_input_stream(posixpath.join(path, METRICS_FILE)) as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def progress_line(m: dict[str, Any]) -> str:
    step, total = m["step"], m["total_steps"]
    done = step - m["attempt_start_step"]  # steps this attempt has run (a resumed run starts later)
    eta = m["attempt_seconds"] / done * (total - step) if done > 0 else float("nan")
    line = (f"step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
            f"{m['tokens_per_s']:,.0f} tok/s")
    if m.get("mfu") is not None:
        line += f" MFU {100 * m['mfu']:.1f}%"
    if "val_loss" in m:
        line += f" | val_loss {m['val_loss']:.4f}" + (f" val_ppl {m['val_ppl']:.1f}" if "val_ppl" in m else "")
    if "workers" in m:
        line += f" | {m['workers']} worker{'s' if m['workers'] != 1 else ''}"
    return line + (f" | ETA {eta:.0f}s" if eta == eta else "")


class Progress(UserCallback):
    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.records: list[dict[str, Any]] | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = dict(metrics[0])  # rank 0's report; all ranks report the same reduced values
        if self.records is None:
            self.records = read_metrics(self.run_uri)
        m["time"] = time.time()
        if checkpoint is not None:
            m["checkpoint"] = checkpoint.path
        self.records = [r for r in self.records if r["step"] < m["step"]] + [m]
        fs, path = resolve(self.run_uri)
        data = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        write_file_atomic(fs, posixpath.join(path, METRICS_FILE), data)
        print(progress_line(m), flush=True)


def loss_curve_png(records: list[dict[str, Any]], title: str) -> bytes:
    """Training and validation loss against step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
