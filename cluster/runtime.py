"""Where a job runs: the config keys every job shares, connecting its driver to Ray, and changes to
process-wide state that last only as long as the step that needs them.

A cluster address from config or RAY_ADDRESS wins; with neither, the job starts an embedded local
Ray. jobs.pipeline runs every stage in one driver process, so a stage that changes the environment
or Ray Data's context does it inside `scoped_environ` / `scoped_attrs`: the next stage starts from
what the process had before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("helio")
_UNSET = object()


@dataclass(frozen=True)
class JobConfig:
    """The keys every job's config starts with; a job's config inherits them (and may change the
    default `name`), so its YAML keys stay flat."""

    name: str = "job"  # what the job makes: the artifact's (or the application's, the pipeline's) name
    storage: str = "./runs"  # the root every artifact lives under (a folder, s3:// or gs://)
    ray_address: str | None = None  # else RAY_ADDRESS, else an embedded local cluster
    local_cpus: int | None = None  # CPUs of the embedded cluster (default: all of this machine)


def embedded(cfg: JobConfig) -> bool:
    """True when the job starts its own local Ray (no address in the config nor in RAY_ADDRESS)."""
    return not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def connect_job(cfg: JobConfig) -> None:
    """Every job's one connect step: checks that the job's storage can be reached (an object store's
    bucket exists), connects this driver to the job's Ray and logs where it runs."""
    from cluster.storage import Storage

    Storage(cfg.storage).check_reachable()
    log.info(connect(cfg.ray_address, cfg.local_cpus))


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connects this driver to Ray once; returns a line saying where it runs.

    `address` (config) wins over RAY_ADDRESS; with neither, `ray.init()` starts
    an embedded local cluster sized to this machine (or to `num_cpus`).
    """
    import ray

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
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the block, then gives each its value from before (or unsets it).

    For settings Ray reads from the driver's environment when a step starts (Ray Train's controller
    copies its RAY_TRAIN_* variables when `fit` starts it): they reach that step and no other.
    """
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def scoped_attrs(obj: Any, **values: Any) -> Iterator[Any]:
    """Sets attributes of a process-wide object (Ray Data's DataContext) for the block, then restores
    them; yields the object."""
    before = {k: getattr(obj, k, _UNSET) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in before.items():
            if v is _UNSET:
                delattr(obj, k)
            else:
                setattr(obj, k, v)
