"""What a Ray Train run asks of the cluster and how it survives failures, and the checks made before
one starts: that the embedded cluster can place it, and that a run folder it resumes is the same run.

Shared by jobs.pretrain and jobs.finetune (both configs compose `resources` and `failure`); the run
itself is started by actors/train_driver.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cluster.cli import UserError
from cluster.config import ConfigError
from cluster.storage import resolve


@dataclass(frozen=True)
class ResourcesConfig:
    # A fixed group size, or [min, max]: an elastic group. Ray Train starts as many as the cluster has room
    # for (up to max), continues with fewer when a node is lost (down to min), and grows again when room
    # comes back (checked every resize_check_s). The global batch is micro_batch x grad_accum x max
    # whatever the size: a smaller group accumulates more micro-batches, so every size trains the same run.
    num_workers: int | tuple[int, ...] = 2
    cpus_per_worker: float = 0.5  # on a small machine leave CPU for Ray Data's read tasks
    use_gpu: bool = False
    # Training input up to this many MiB of Parquet is read once by the driver and handed to the
    # workers through the object store; larger input streams from storage with Ray Data's Parquet
    # reader, whose start-up (listing, footer-reading actors, read tasks, per worker) costs tens of
    # seconds on a small machine. 0: always stream. Ray Data's local shuffle draws from the blocks
    # it is handed, so a shuffled run's order depends on which way its input came: keep this
    # setting when resuming a run.
    in_memory_mb: float = 256.0
    resize_check_s: float = 60.0  # elastic: how often a running group looks for room to grow

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, tuple) and len(self.num_workers) != 2:
            raise ValueError(f"num_workers: an elastic group is [min, max], not {list(self.num_workers)}")
        if self.min_workers < 1:
            raise ValueError("num_workers: must be at least 1")
        if self.min_workers > self.max_workers:
            raise ValueError(f"num_workers: min {self.min_workers} exceeds max {self.max_workers}")
        if self.resize_check_s <= 0:
            raise ValueError("resize_check_s: must be positive")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker: must be positive")
        if self.in_memory_mb < 0:
            raise ValueError("in_memory_mb: must be >= 0")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The largest group; the global batch is sized for it."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def describe(self) -> str:
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.num_workers)


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 1  # worker-group restarts from the latest checkpoint; -1: unlimited
    num_to_keep: int = 2  # checkpoints kept in the run folder
    # A worker group that cannot be placed (a lost node that never comes back, resources the cluster
    # will never have) is retried this many times, each after start_timeout_s, then the job fails
    # instead of waiting forever. -1: retry forever (an autoscaler that is slow to add nodes).
    controller_failure_limit: int = 3
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError("max_failures: must be -1 (unlimited) or >= 0")
        if self.controller_failure_limit < -1:
            raise ValueError("controller_failure_limit: must be -1 (unlimited) or >= 0")
        if self.num_to_keep < 1:
            raise ValueError("num_to_keep: must be at least 1")
        if not self.start_timeout_s > 0:
            raise ValueError("start_timeout_s: must be positive")


def elastic_max(r: ResourcesConfig) -> int:
    """What the worker loop config's `max_workers` is: the largest group of an elastic run, else 0."""
    return r.max_workers if r.elastic else 0


def check_resources(r: ResourcesConfig, embedded: bool) -> None:
    """On the embedded cluster, refuse what would wait forever instead of failing."""
    import ray

    if not embedded:
        return  # a cloud cluster's autoscaler may add what is missing
    res = ray.cluster_resources()
    if r.use_gpu and res.get("GPU", 0) < r.min_workers:  # an elastic group can start with fewer than max
        raise ConfigError("resources.use_gpu", f"{r.min_workers} GPU workers asked for, this machine has "
                                               f"{int(res.get('GPU', 0))} GPUs")
    n = r.max_workers  # an elastic group takes every worker there is room for, up to max
    cpus, asked = res.get("CPU", 0), n * r.cpus_per_worker
    if asked >= cpus:
        raise ConfigError("resources.cpus_per_worker", f"{n} workers x {r.cpus_per_worker} CPU take all "
                                                       f"{cpus:g} CPUs and leave none for Ray Data's reads (the run "
                                                       f"would hang); use at most {max(cpus - 1, 0.5) / n:g}")


def check_elastic(r: ResourcesConfig, grad_accum: int, zero_stage: int) -> None:
    """An elastic group must be able to train the same global batch at every size it may take."""
    if not r.elastic:
        return
    if zero_stage == 3:
        raise ConfigError("resources.num_workers", "an elastic group needs ZeRO stage 0, 1 or 2: DeepSpeed's "
                                                   "universal checkpoint resumes a ZeRO-3 run at another size only "
                                                   "approximately (its losses drift by 5e-4 within 8 steps)")
    micro_batches = grad_accum * r.max_workers  # per optimizer step, shared out among the workers
    uneven = [n for n in range(r.min_workers, r.max_workers + 1) if micro_batches % n]
    if uneven:
        raise ConfigError("resources.num_workers", f"a group of {uneven[0]} workers cannot share the "
                                                   f"{micro_batches} micro-batches of a step (grad_accum x max "
                                                   f"workers) evenly; pick a range whose sizes all divide "
                                                   f"{micro_batches}, or raise train.grad_accum")


def check_resumable(run_uri: str, identity: dict[str, Any], resources: ResourcesConfig) -> None:
    """A run folder with checkpoints is resumed; refuse it if they came from a different run.

    `identity` is what a checkpoint must agree on (the worker loop config's `identity()`). A fixed
    group resumes at its own size only; an elastic one at any size (a universal checkpoint, converted
    by the workers when the size changed).
    """
    import pyarrow.fs as pafs

    from cluster.zero import COMPLETE

    fs, path = resolve(run_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    folders = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        try:
            with fs.open_input_stream(f"{folder}/{COMPLETE.format(rank=0)}") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            continue
        theirs, ours = record["client_state"].get("run", {}), identity
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if not resources.elastic and record["world_size"] != resources.num_workers:
            differ.append(f"num_workers ({record['world_size']} there)")
        if differ:
            raise UserError(f"run folder {run_uri} holds a checkpoint (step {record['client_state']['step']}) of a "
                            f"run that differs in {', '.join(differ)}; resuming it would mix two runs: pick "
                            f"another name, or delete that folder to start over")
        return
