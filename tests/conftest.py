"""Shared fixtures: one real local Ray cluster per test session, started on first use."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # parity tests build their checkpoints locally; nothing is downloaded


VLLM = importlib.util.find_spec("vllm") is not None


def pytest_report_header(config):
    return None if VLLM else "vLLM is not installed here: tests marked vllm are deselected (make test-vllm runs them)"


def pytest_collection_modifyitems(config, items):
    """Tests marked vllm need vLLM, which Helio's own environment never has: there they are deselected
    (counted as such in the summary), not skipped."""
    if VLLM:
        return
    needs = [item for item in items if item.get_closest_marker("vllm")]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server, tests/s3_server.py), reached through the AWS environment
    variables; a test makes its own bucket (`S3Server.create_bucket`)."""
    from s3_server import S3Server

    s3 = S3Server().start()
    os.environ.update(s3.env)
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="session")
def ray_context(s3_server):
    """A real local Ray cluster with 2 CPUs, shared by every test that asks for it: ray.init's context.
    It also declares one GPU, a resource with no device behind it, so that a test can see which device a
    worker Ray assigned a GPU to picks (tests/test_devices.py); nothing else asks for it."""
    import ray

    from tiny_data import free_port

    # s3_server first: its AWS environment variables are set before Ray starts, so every worker has them.
    # "local": its own cluster, even with a `ray start` head running on this machine (make demo's).
    # With its dashboard, as cluster/runtime.py's embedded one: Ray Train frees the workers' placement
    # group of a controller that died through the dashboard's state API.
    context = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), log_to_driver=False)
    try:
        yield context
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_context):
    """The `ray` module, connected to the session's cluster."""
    import ray

    return ray


@pytest.fixture(scope="session")
def dashboard_url(ray_context) -> str:
    """The session cluster's dashboard, for tests that ask Ray's REST API."""
    return f"http://{ray_context.dashboard_url}"


@pytest.fixture(scope="session")
def serve_ports(ray_cluster) -> dict[str, int]:
    """One Ray Serve per session: its HTTP and gRPC proxies get these loopback ports (the first
    application deployed starts them). Each module runs its own application on them (`http.port`,
    `grpc.port`) and deletes it when done; Serve itself is shut down once, at the end."""
    from ray import serve

    from tiny_data import free_port

    try:
        yield {"http": free_port(), "grpc": free_port()}
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The dataset and the GPT, encoder and classifier artifacts several job test modules share, built
    once (tests/tiny_data.py `build_store`); modules add artifacts under names of their own."""
    from tiny_data import build_store

    return build_store(str(tmp_path_factory.mktemp("store")))
