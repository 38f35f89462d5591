"""Serve model artifacts over an OpenAI-compatible HTTP API on Ray Serve.

    python -m jobs.serve jobs/configs/serve_demo.yaml [--set http.port=8001 ...]
    serve run jobs.serve:app storage=./runs            # the same application as a Serve builder
    serve deploy jobs/configs/serve_app.yaml           # onto a running cluster, with a Serve config file

Each entry of `models` hosts one model artifact under `storage` as a
deployment (`generate`: a GPT, float or quantized; `embed`: an encoder;
`classify`: a sequence classifier), behind one ingress that answers
OpenAI-compatible HTTP on `http.host:http.port` and gRPC
(actors/proto/helio.proto) on `grpc.port`. On the embedded default the job
keeps serving until interrupted; against a running cluster (`RAY_ADDRESS` or
`ray_address`) it deploys and returns.

This module deploys; the config and the application it builds are in
actors/serve_app.py, the sample requests and the monitor's references in
actors/serve_client.py.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

# What the job is made of lives in actors/ (jobs.query and jobs.pipeline use it too); the names
# callers of jobs.serve know stay importable from here.
from actors.serve_app import (BACKPRESSURE, ENDPOINT_KINDS, GRPC_SERVICERS, Autoscaling, Canary, GrpcConfig,
                              HttpConfig, ModelEntry, ServeConfig, api_keys, app_url, build_app, entries,
                              proxy_options, routing)
from actors.serve_client import PROBE, SAMPLE, grpc_health, post, record_references, samples
from cluster.cli import UserError, format_summary, run_job
from cluster.config import load_config
from cluster.runtime import connect_job, embedded
from cluster.storage import Storage

log = logging.getLogger("helio")
__all__ = ["BACKPRESSURE", "ENDPOINT_KINDS", "GRPC_SERVICERS", "PROBE", "SAMPLE", "Autoscaling", "Canary",
           "GrpcConfig", "HttpConfig", "ModelEntry", "ServeConfig", "api_keys", "app", "build_app",
           "config_from_args", "deploy", "entries", "grpc_health", "main", "monitor_app", "post", "proxy_options",
           "record_references", "routing", "run", "samples", "wait_running"]


def app(args: dict[str, Any]):
    """The Serve builder (`serve run jobs.serve:app key=value ...`, or a Serve config's import_path):
    `args` are this job's config keys; `config` names a YAML file to start from."""
    return build_app(config_from_args(args))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    args = dict(args)
    path = args.pop("config", os.path.join(os.path.dirname(__file__), "configs", "serve_demo.yaml"))
    return load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()])


def deploy(cfg: ServeConfig) -> str:
    """Starts Serve's proxies where the config says and deploys the application; returns its HTTP URL."""
    from ray import serve

    from actors.monitor import routing_path

    application = build_app(cfg)  # checks every artifact before anything starts
    store = Storage(cfg.storage)
    store.write_json(routing_path(cfg.name), {"models": {}})  # no canary gets traffic or probes while deploying
    serve.start(**proxy_options(cfg))
    serve.run_many([serve.RunTarget(application, name=cfg.name, route_prefix=cfg.route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_running(cfg.name, cfg.start_timeout_s)
    store.write_json(routing_path(cfg.name), routing(cfg))  # once every version serves
    return app_url(cfg)


def wait_running(name: str, timeout_s: float) -> None:
    """Waits for application `name` to serve. One that failed (a replica raised in `__init__`) or is
    not serving after `timeout_s` (replicas the cluster has no room for) is deleted, so that it holds
    neither the route nor a request for nodes, and the job fails in one sentence that says why."""
    import ray
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = app.status if app else ApplicationStatus.NOT_STARTED
        if state == ApplicationStatus.RUNNING:
            return
        if state == ApplicationStatus.DEPLOY_FAILED:
            why = _first_line(app.message)
            break
        if time.monotonic() > deadline:
            waiting = [f"deployment '{d}' is {s.status} ({_first_line(s.message)})"
                       for d, s in (app.deployments.items() if app else ()) if s.status != "HEALTHY"]
            free = ray.available_resources().get("CPU", 0.0)
            why = (f"not serving after {timeout_s:g} s (start_timeout_s): {'; '.join(waiting) or state}; "
                   f"the cluster has {free:g} CPU free")
            break
        time.sleep(0.5)
    serve.delete(name)
    raise UserError(f"application '{name}' did not start and was deleted: {why}")


def _first_line(message: str | None) -> str:
    """A Serve status message's first non-blank line (they can run to a traceback)."""
    return next((line.strip() for line in (message or "").splitlines() if line.strip()), "no message")


def run(cfg: ServeConfig) -> str:
    connect_job(cfg)
    url = deploy(cfg)
    rows = [(m.id, f"{m.task}: {m.artifact} ({m.replicas} replica(s))") for m in cfg.models]
    rows += [("HTTP", f"{url}/v1 (OpenAI-compatible), {url}/health")]
    if cfg.grpc.port:
        rows += [("gRPC", f"{cfg.http.host}:{cfg.grpc.port} (helio.v1.Helio, grpc.health.v1.Health)")]
    refs = record_references(cfg, url)
    rows += [("references", f"{len(refs['models'])} models' answers to their probes, for jobs.monitor")]
    print(format_summary(f"serving '{cfg.name}'", rows))
    print(samples(cfg, url), flush=True)
    if cfg.monitor:
        monitor_app(cfg)
    if not embedded(cfg):
        return url
    if cfg.serve_seconds is None:
        print("serving until interrupted (Ctrl-C)", flush=True)
    time.sleep(cfg.serve_seconds if cfg.serve_seconds is not None else float("inf"))
    return url


def monitor_app(cfg: ServeConfig) -> dict:
    """The app's monitor from the `monitor` config file, as jobs.monitor starts it with
    `monitor_seconds=0`: started, a first round of probes waited for and printed; its status."""
    from actors.monitor import MonitorConfig, first_round, format_status, read_references

    monitor = load_config(MonitorConfig, cfg.monitor, [f"storage={cfg.storage}", f"app={cfg.name}",
                                                       "monitor_seconds=0"])
    refs = read_references(monitor)
    connect_job(monitor)
    _, status = first_round(monitor, refs)
    print(format_status(status), flush=True)
    return status


CONFIG_CLASS = ServeConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.serve", __doc__, ServeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
