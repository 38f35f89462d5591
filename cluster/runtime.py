"""Connecting to Ray: a cluster address from config or RAY_ADDRESS, else an embedded one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("helio")


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connects this driver to Ray once; returns a line saying where it runs.

    `address` (config) wins over RAY_ADDRESS; with neither, `ray.init()` starts
    an embedded local cluster sized to this machine (or to `num_cpus`).
    """
    if ray.is_initialized():
        return "already connected to Ray"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"connected to the Ray cluster at {address}"
    # "local": a new cluster of its own, even where `ray start` left a head running (make demo does);
    # the dashboard also serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"started an embedded local Ray cluster with {cpus} CPUs"


def cluster_cpus() -> int:
    """CPUs the connected cluster has right now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
