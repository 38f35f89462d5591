"""ray_cluster.yaml, offline: Ray's own preparation and schema accept it, and every shipped job and
Serve config fits on its node types (a bundle no node could hold would wait for ever on a cloud)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from cluster.capacity import Request, load_cluster, nodes_at_max, requests, unplaceable
from cluster.config import load_config
from test_config import CONFIGS, job_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(ROOT / "ray_cluster.yaml")


def test_ray_accepts_the_cluster_definition_and_it_has_head_cpu_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and cluster["head_node_type"] == "head"
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["cpu_worker"]["resources"]["CPU"] >= 1
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 == types[name]["min_workers"] < types[name]["max_workers"], name
    assert cluster["idle_timeout_minutes"] > 0


def test_every_node_starts_ray_with_token_auth_and_installs_helio_like_the_readme(cluster):
    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any("ray start --head" in c and "--dashboard-host=127.0.0.1" in c for c in starts)
    assert raw["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("make install" in c for c in raw["setup_commands"])
    gpu = raw["available_node_types"]["gpu_worker"]
    assert any("make install TORCH_SPEC=" in c and "cu1" in c for c in gpu["worker_setup_commands"])
    # the driver and CUDA come with the image (a driver installed by a setup command needs a reboot first)
    assert gpu["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")
    assert not any("nvidia-driver" in c or "cuda" in c.split("TORCH_SPEC")[0] for c in gpu["worker_setup_commands"])


def test_only_ssh_is_open_and_never_to_the_whole_internet(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])


def test_a_request_too_big_for_any_node_or_for_the_whole_cluster_is_caught(cluster):
    assert "no node type has" in unplaceable(cluster, Request("x", ({"GPU": 8},)))
    gpus = sum(res.get("GPU", 0) for _, res in nodes_at_max(cluster))
    assert unplaceable(cluster, Request("x", ({"GPU": 1},) * int(gpus))) is None
    assert "do not fit" in unplaceable(cluster, Request("x", ({"GPU": 1},) * int(gpus + 1)))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_fits_on_the_cluster(cluster, path):
    module = importlib.import_module(job_of(path))
    cfg = load_config(module.CONFIG_CLASS, path)
    job = module.__name__.split(".")[-1]
    stages = [(s.job, s.config) for s in module.plan(cfg)] if job == "pipeline" else [(job, cfg)]
    asked = [r for j, c in stages for r in requests(j, c)]
    assert asked or job in ("monitor", "status", "rollout")
    for r in asked:
        assert unplaceable(cluster, r) is None, unplaceable(cluster, r)
