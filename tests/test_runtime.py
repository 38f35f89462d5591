"""cluster/runtime.py without a Ray cluster: the keys every job shares, and process-wide changes that a
pipeline stage makes for itself only (jobs.pipeline runs every stage in one driver process)."""

from __future__ import annotations

import dataclasses
import os
import types

import pytest

from cluster.config import from_dict, to_dict
from cluster.runtime import JobConfig, embedded, scoped_attrs, scoped_environ

VAR = "HELIO_TEST_SCOPED_VARIABLE"


def test_scoped_environ_restores_a_value_and_an_absence(monkeypatch):
    monkeypatch.setenv(VAR, "before")
    monkeypatch.delenv(VAR + "_NEW", raising=False)
    with scoped_environ({VAR: "during", VAR + "_NEW": "x"}):
        assert os.environ[VAR] == "during" and os.environ[VAR + "_NEW"] == "x"
    assert os.environ[VAR] == "before" and VAR + "_NEW" not in os.environ


def test_scoped_environ_restores_after_an_error(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    with pytest.raises(RuntimeError), scoped_environ({VAR: "during"}):
        raise RuntimeError("the step failed")
    assert VAR not in os.environ


def test_scoped_attrs_restores_what_was_there_and_what_was_not():
    ctx = types.SimpleNamespace(preserve_order=False)
    with pytest.raises(RuntimeError), scoped_attrs(ctx, preserve_order=True, extra=1) as got:
        assert got is ctx and ctx.preserve_order and ctx.extra == 1
        raise RuntimeError("the step failed")
    assert ctx.preserve_order is False and not hasattr(ctx, "extra")


def test_training_sets_ray_trains_start_timeout_for_its_own_run_only(tmp_path, monkeypatch):
    """actors.train_driver.fit with Ray Train's trainer replaced: the controller (created inside
    `trainer.fit()`) sees the configured start timeout; the process has its old environment after."""
    import ray
    import ray.data
    import ray.train.torch

    import actors.train_report as report
    from actors import train_driver
    from actors.train_loop import LoopConfig, TrainConfig
    from cluster.storage import Storage
    from cluster.train_run import FailureConfig, ResourcesConfig
    from cluster.zero import OptimConfig, ZeroConfig
    from models.arch import ModelConfig

    seen = {}

    class Trainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            seen["timeout"] = os.environ.get(train_driver.START_TIMEOUT_ENV)
            seen["progress_bars"] = ray.data.DataContext.get_current().enable_progress_bars
            return types.SimpleNamespace(metrics={}, checkpoint=None)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: None)
    monkeypatch.setattr(report, "read_metrics", lambda uri: [])
    monkeypatch.setattr(report, "loss_curve_png", lambda records, title: b"png")
    monkeypatch.setenv(train_driver.START_TIMEOUT_ENV, "7")
    bars = ray.data.DataContext.get_current().enable_progress_bars
    loop = LoopConfig(model=ModelConfig(), train=TrainConfig(), zero=ZeroConfig(), optim=OptimConfig(), vocab_size=64,
                      block_len=9, train_blocks=4)
    train_driver.fit("run", Storage(str(tmp_path)), loop, [], ResourcesConfig(), FailureConfig(start_timeout_s=42.0),
                     "title")
    assert seen == {"timeout": "42.0", "progress_bars": False}
    assert os.environ[train_driver.START_TIMEOUT_ENV] == "7"
    assert ray.data.DataContext.get_current().enable_progress_bars == bars
    assert not ray.is_initialized()  # nothing here started Ray


@dataclasses.dataclass(frozen=True)
class StageConfig(JobConfig):
    name: str = "stage"
    steps: int = 1


def test_a_job_config_keeps_the_shared_keys_flat():
    cfg = from_dict(StageConfig, {"storage": "/s", "ray_address": "auto", "steps": 3})
    assert cfg == StageConfig(name="stage", storage="/s", ray_address="auto", local_cpus=None, steps=3)
    assert set(to_dict(cfg)) == {"name", "storage", "ray_address", "local_cpus", "steps"}


def test_embedded_means_no_address_in_the_config_nor_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert embedded(StageConfig()) and not embedded(StageConfig(ray_address="auto"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not embedded(StageConfig())
