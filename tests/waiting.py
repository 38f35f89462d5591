"""Waiting on a cluster without sleeping blindly: poll a value until it holds, and read Ray's metrics."""

from __future__ import annotations

import time
import urllib.request

import pytest


def poll(what, check, timeout_s: float = 90.0, every: float = 0.25):
    """`what()` until `check` holds on it (returned), or the test fails after `timeout_s` naming the last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if check(value):
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout_s}s; last value: {value}")


def ray_metrics() -> str:
    """This node's Prometheus exposition, where ray.util.metrics counters appear as ray_<name>_total."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(what: str, check, timeout: float, every: float = 0.5, job=None):
    """Polls `check` until it is truthy; with `job` (a running `ray job submit`), stops as soon as the
    job ends and shows what it printed, as it does on a timeout (after ending the job)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        ended = job is not None and job.poll() is not None
        if ended or time.monotonic() > deadline:
            if job is not None and not ended:
                job.kill()
            log = job.communicate()[0][-4000:] if job is not None else ""
            why = f"the job ended (exit {job.returncode})" if ended else f"timed out after {timeout:.0f} s"
            raise AssertionError(f"{why} waiting for {what}\n{log}")
        time.sleep(every)
