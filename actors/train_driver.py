"""The driver's side of a Ray Train run: Ray Train workers running actors/train_loop.py over Parquet
shards, with Helio's resources, failure policy and checkpoint folder; the loss curve drawn at the end.

Shared by jobs.pretrain and jobs.finetune. Settings Ray Train reads from the driver's process (an
environment variable its controller copies, Ray Data's progress bars) are set for the run only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from actors.train_loop import LoopConfig
from cluster.cli import JobFailed
from cluster.config import to_dict
from cluster.runtime import scoped_attrs, scoped_environ
from cluster.storage import Storage, resolve, write_file_atomic
from cluster.train_run import FailureConfig, ResourcesConfig

log = logging.getLogger(__name__)

# Read by Ray Train's controller, which copies them from this driver's environment when `fit` starts it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# The controller collects the workers' reports when it polls them, every 2 s by default, and a worker's
# next ray.train.report waits until its last was collected: a run logging every step was held to one
# step per 2 s (20 reports: 38.3 s at the default, 4.0 s at 0.2 s; benchmarks/train_reports.py).
POLL_S = 0.2


def fit(name: str, store: Storage, loop: LoopConfig, train_uris: list[str], resources: ResourcesConfig,
        failure: FailureConfig, title: str, columns: list[str] | None = None, tracking: dict[str, str] | None = None,
        params: dict[str, Any] | None = None) -> tuple[Any, list[dict], float]:
    """Runs the Ray Train workers (actors/train_loop.py) over Parquet `train_uris` in `{storage}/runs/{name}`.

    Returns (Ray Train result, metrics records, seconds); draws the loss curve into the run folder.
    `tracking` (TrackingConfig.targets): every report also goes to MLflow / TensorBoard, the job's config
    `params` to MLflow once, and the loss curve to the MLflow run's artifacts at the end.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.train_loop import train_loop
    from actors.train_report import CURVE_FILE, Progress, loss_curve_png, read_metrics
    from actors.train_tracking import Tracking, log_files

    run_uri = store.to_uri(f"{store.root_path}/runs/{name}")
    # workers print progress lines instead of Ray Data's bars
    with scoped_attrs(ray.data.DataContext.get_current(), enable_progress_bars=False), \
            scoped_environ({START_TIMEOUT_ENV: str(failure.start_timeout_s), POLL_ENV: str(POLL_S)}):
        datasets = {"train": training_input(train_uris, columns, resources.in_memory_mb)}
        exec_opts = ray.data.ExecutionOptions(preserve_order=True)  # the same order on every worker, every attempt
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=to_dict(loop),
            scaling_config=ray.train.ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                                   resources_per_worker={"CPU": resources.cpus_per_worker},
                                                   elastic_resize_monitor_interval_s=resources.resize_check_s),
            run_config=ray.train.RunConfig(
                name=name, storage_path=store.to_uri(f"{store.root_path}/runs"),
                failure_config=ray.train.FailureConfig(max_failures=failure.max_failures,
                                                       controller_failure_limit=failure.controller_failure_limit),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=failure.num_to_keep),
                callbacks=[Progress(run_uri)] + ([Tracking(tracking, run_uri, name, params or {})] if tracking else [])),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=exec_opts),
        )
        t0 = time.time()
        resume = (f"checkpoints are in {run_uri}: run the job again with the same name and storage to resume from "
                  f"the latest")
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise JobFailed(f"training failed (failure.max_failures={failure.max_failures}, controller_failure_limit="
                            f"{failure.controller_failure_limit}): {cause(e)}; {resume}") from None
        except ray.exceptions.RayActorError as e:  # the controller's own process (or its node) went away
            released = release_placement_groups(e.actor_id)
            if released:
                log.warning("removed %d placement group(s) the dead controller still held", released)
            raise JobFailed(f"Ray Train's controller died before the run ended: {cause(e)}; {resume}") from None
        seconds = time.time() - t0
    records = read_metrics(run_uri)
    fs, run_path = resolve(run_uri)
    curve = loss_curve_png(records, title)
    write_file_atomic(fs, f"{run_path}/{CURVE_FILE}", curve)
    if tracking:
        log_files(tracking, run_uri, name, params or {}, {CURVE_FILE: curve})
    return result, records, seconds


def training_input(uris: list[str], columns: list[str] | None, in_memory_mb: float):
    """The Ray Dataset the workers read: Parquet `uris` in order, held in the object store when they
    total at most `in_memory_mb` MiB, else streamed from storage.

    Either way, each worker iterates the same rows in the same order as every other worker. Held in
    memory, each file is one block. Ray Data's local shuffle depends on the blocks, so the two ways can
    order a shuffled run differently (see ResourcesConfig.in_memory_mb).
    """
    import pyarrow.parquet as pq
    import ray.data

    located = [resolve(u) for u in uris]
    size = sum(fs.get_file_info(path).size for fs, path in located)
    if size > in_memory_mb * 2**20:
        log.info("streaming %d training file(s), %.1f MiB, from storage", len(uris), size / 2**20)
        return ray.data.read_parquet(uris, columns=columns)
    log.info("training input: %d file(s), %.1f MiB, read once into the object store", len(uris), size / 2**20)
    return ray.data.from_arrow([pq.read_table(path, filesystem=fs, columns=columns) for fs, path in located])


def release_placement_groups(actor_id: str | None) -> int:
    """Removes the placement groups a dead actor created (Ray Train's controller creates its workers'
    group); returns how many.

    Ray removes a placement group by itself only when both its creator actor and its creator job are
    dead, and this driver's job lives on. Ray Train watches for this with a detached cleaner actor that
    polls the controller through the State API; on a loaded 2-core machine a full test session once saw
    the group outlive the controller by minutes, holding the workers' CPUs. So the driver, which learns
    of the death first, removes what the controller held. The creator is in the GCS's placement group
    records (`creator_actor_id`), which `ray.util.placement_group_table` leaves out, hence the accessor.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not actor_id:
        return 0
    released = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.creator_actor_id.hex() != actor_id or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            released += 1
        except Exception as e:  # noqa: BLE001 - Ray's cleaner may have won the race
            log.debug("placement group %s: %s", pg.placement_group_id.hex(), e)
    return released


def cause(e: Exception) -> str:
    """The worker's own error, one line, not Ray's wrapping."""
    errors = getattr(e, "worker_failures", None) or {}
    if errors:
        rank, err = sorted(errors.items())[0]
        return f"worker rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    return str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
