"""Experiment tracking for pretrain and finetune runs: MLflow and TensorBoard, through their own APIs.

`Tracking` is a Ray Train callback, like actors/train_report.py's `Progress`: it runs in the train
controller and sees every report once (rank 0's reduced values, so nothing is logged twice). Each
report's numbers go to MLflow (`log_batch`, at the report's step) and to TensorBoard (a scalar per
metric). The MLflow run is found by its `helio.run` tag (the run folder): a resumed job continues the
same MLflow run, and the job's config goes in as params once, when the run is created. After the job
exports, `log_files` adds the loss curve and the manifest as the run's artifacts.

A tracker that is down or misconfigured never stops training: each failure is a warning line and
counts in `failures` (the driver's own count goes into the model manifest's `tracking`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

log = logging.getLogger("helio")
RUN_TAG = "helio.run"
SKIPPED = ("step", "total_steps", "attempt_start_step", "time", "epoch")  # bookkeeping, not measurements


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: bool = False  # log params, metrics and artifacts to MLflow
    mlflow_uri: str = ""  # a tracking URI (sqlite:///..., http://server); default {storage}/tracking/mlflow.db
    experiment: str = "helio"
    tensorboard: bool = False  # write TensorBoard event files
    tensorboard_dir: str = ""  # default {storage}/tracking/tensorboard; a run's events go in {dir}/{name}

    def targets(self, storage: str) -> dict[str, str]:
        """{mlflow_uri, experiment, tensorboard_dir} for what is on; defaults under a local `storage`."""
        local = "://" not in storage or storage.startswith("file://")
        root = Path(storage.removeprefix("file://")).resolve() / "tracking"
        out: dict[str, str] = {}
        if self.mlflow:
            if not self.mlflow_uri and not local:
                raise ValueError(f"mlflow_uri: storage '{storage}' is not a local folder, so MLflow needs a "
                                 "tracking URI of its own (an MLflow server, or sqlite:///a/local/file.db)")
            out |= {"mlflow_uri": self.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}", "experiment": self.experiment}
        if self.tensorboard:
            if not self.tensorboard_dir and not local:
                raise ValueError(f"tensorboard_dir: storage '{storage}' is not a local folder; name a log directory")
            out["tensorboard_dir"] = self.tensorboard_dir or str(root / "tensorboard")
        return out


def tracking_targets(cfg: TrackingConfig, storage: str) -> dict[str, str]:
    """`cfg.targets(storage)`, a mistake as the ConfigError naming the key."""
    from cluster.config import ConfigError

    try:
        return cfg.targets(storage)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(f"tracking.{key}", message) from None


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (MLflow keeps 6000 characters)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v)[:6000] if not isinstance(v, str) else v[:6000]
    return out


def mlflow_run(targets: dict[str, str], run_key: str, run_name: str, params: dict[str, Any]) -> tuple[Any, str]:
    """(MlflowClient, run id) of the run tagged `run_key`, created (with `params`) if there is none."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(targets["mlflow_uri"])
    experiment = client.get_experiment_by_name(targets["experiment"])
    if experiment is None:
        uri = targets["mlflow_uri"]
        artifacts = (str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts") if uri.startswith("sqlite:///")
                     else None)  # beside the database, not in the working directory
        experiment_id = client.create_experiment(targets["experiment"], artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_key}'", max_results=1)
    if found:
        return client, found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_key})
    items = [Param(k, v) for k, v in flat(params).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return client, run.info.run_id


class Tracking(UserCallback):
    """Every report to MLflow and TensorBoard (those `targets` names), never failing the run."""

    def __init__(self, targets: dict[str, str], run_key: str, run_name: str, params: dict[str, Any]):
        self.targets, self.run_key, self.run_name, self.params = targets, run_key, run_name, params
        self.mlflow: tuple[Any, str] | None = None
        self.writer: Any = None
        self.failures = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]
        values = {k: float(v) for k, v in m.items()
                  if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "mlflow_uri" in self.targets:
            self._guard("MLflow", self._to_mlflow, values, int(m["step"]))
        if "tensorboard_dir" in self.targets:
            self._guard("TensorBoard", self._to_tensorboard, values, int(m["step"]))

    def _to_mlflow(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.mlflow is None:
            self.mlflow = mlflow_run(self.targets, self.run_key, self.run_name, self.params)
        client, run_id = self.mlflow
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _to_tensorboard(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(self.targets["tensorboard_dir"]) / self.run_name))
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker never costs the run
            self.failures += 1
            print(f"tracking: {what} failed ({self.failures} so far), training goes on: "
                  f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300], flush=True)


def log_files(targets: dict[str, str], run_key: str, run_name: str, params: dict[str, Any],
              files: dict[str, bytes]) -> dict[str, Any]:
    """The job's closing artifacts (loss curve, manifest) into the run's MLflow artifacts; what to record
    in the manifest: {mlflow_run_id, failures}. A failure is a warning, never the job's."""
    if "mlflow_uri" not in targets:
        return {}
    try:
        client, run_id = mlflow_run(targets, run_key, run_name, params)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                (Path(d) / name).write_bytes(data)
                client.log_artifact(run_id, str(Path(d) / name))
        return {"mlflow_run_id": run_id, "failures": 0}
    except Exception as e:  # noqa: BLE001
        log.warning("tracking: MLflow failed, the job goes on: %s: %s", type(e).__name__, e)
        return {"failures": 1}
