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


@pytest.mark.ray
def test_the_embedded_cluster_refuses_a_group_that_would_leave_no_cpu_for_ray_data(ray_cluster):
    """On the session's 2-CPU cluster: 2 workers x 0.5 CPU fit; an elastic group counts at its largest, since
    it takes every worker there is room for."""
    from cluster.config import ConfigError
    from cluster.train_run import ResourcesConfig, check_resources

    assert ray_cluster.cluster_resources()["CPU"] == 2
    check_resources(ResourcesConfig(num_workers=2, cpus_per_worker=0.5), embedded=True)
    check_resources(ResourcesConfig(num_workers=(1, 2), cpus_per_worker=0.5), embedded=True)
    check_resources(ResourcesConfig(num_workers=(1, 4), cpus_per_worker=0.5), embedded=False)  # a cluster can grow
    for resources in (ResourcesConfig(num_workers=4, cpus_per_worker=0.5),
                      ResourcesConfig(num_workers=(1, 4), cpus_per_worker=0.5)):
        with pytest.raises(ConfigError, match="4 workers x 0.5 CPU take all 2 CPUs"):
            check_resources(resources, embedded=True)
