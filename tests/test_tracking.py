"""actors/train_tracking.py: where tracking goes, and a tracker that fails never stops a run (the logged
history of a real run, read back with MLflow's and TensorBoard's readers, is tests/test_pipeline.py's)."""

from __future__ import annotations

import pytest

from actors.train_tracking import Tracking, TrackingConfig, flat, tracking_targets
from cluster.config import ConfigError

REPORT = {"step": 4, "total_steps": 6, "attempt_start_step": 0, "loss": 2.5, "lr": 1e-3, "mfu": None,
          "checkpoint": "/x", "tokens_per_s": 100.0}


def test_targets_default_under_a_local_storage_and_need_a_uri_on_an_object_store(tmp_path):
    on = TrackingConfig(mlflow=True, tensorboard=True)
    assert tracking_targets(on, str(tmp_path)) == {
        "mlflow_uri": f"sqlite:///{tmp_path}/tracking/mlflow.db", "experiment": "helio",
        "tensorboard_dir": f"{tmp_path}/tracking/tensorboard"}
    assert tracking_targets(TrackingConfig(), "s3://bucket/helio") == {}
    with pytest.raises(ConfigError, match="'tracking.mlflow_uri': storage 's3://bucket/helio' is not a local folder"):
        tracking_targets(on, "s3://bucket/helio")
    assert flat({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_a_tracker_that_fails_costs_a_warning_and_a_count_never_the_run(tmp_path, capsys):
    (tmp_path / "not_a_dir").write_text("")
    broken = Tracking({"mlflow_uri": f"sqlite:///{tmp_path}/not_a_dir/mlflow.db", "experiment": "helio",
                       "tensorboard_dir": str(tmp_path / "not_a_dir")}, "run", "run", {"a": 1})
    for _ in range(2):
        broken.after_report(None, [REPORT], None)  # raises nothing
    assert broken.failures == 4
    out = capsys.readouterr().out
    assert out.count("tracking: MLflow failed") == 2 and out.count("tracking: TensorBoard failed") == 2
    assert "training goes on" in out
