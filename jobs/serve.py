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
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.cli import UserError, format_summary, run_job
from cluster.config import ConfigError, load_config, to_dict
from cluster.storage import Storage

log = logging.getLogger("helio")
TASKS = ("generate", "embed", "classify")
BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}  # a request over max_queued_requests
GRPC_SERVICERS = ("actors.proto.helio_pb2_grpc.add_HelioServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server")


@dataclass(frozen=True)
class Autoscaling:
    """Serve's autoscaling_config: replicas between min and max, aiming at target ongoing requests each."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("min_replicas: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if not self.target_ongoing_requests > 0:
            raise ValueError("target_ongoing_requests: must be positive")


@dataclass(frozen=True)
class Canary:
    """A new version of a model, rolled out beside the stable one: it answers `share` of the requests;
    the monitor promotes it after `promote_after` healthy rounds or rolls it back when it turns
    unhealthy (jobs.rollout does either by hand)."""
    artifact: str
    share: float = 0.1
    promote_after: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"share: must be between 0 and 1, got {self.share}")
        if self.promote_after < 1:
            raise ValueError("promote_after: must be at least 1")


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the name clients send as `model`
    artifact: str  # a model artifact under storage (float or quantized)
    task: str = "generate"  # generate | embed | classify
    replicas: int = 1  # a fixed count, unless autoscaling is set
    autoscaling: Autoscaling | None = None
    num_cpus: float = 0.25  # per replica; fractional on small machines
    num_gpus: float = 0.0  # per replica; on a cluster with GPU nodes
    max_batch_size: int = 16  # rows per batch (generate: sequences decoded together)
    batch_wait_s: float = 0.002  # embed / classify: how long a batch waits to fill
    stream_interval_s: float = 0.05  # generate: at most one streamed piece per interval (the first at once)
    max_ongoing_requests: int = 16  # per replica, before requests queue
    max_queued_requests: int = 64  # per caller, before a 503 with Retry-After
    force: bool = False  # serve an artifact its quality gate rejected
    canary: Canary | None = None  # a new version of this model, rolled out beside it

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {', '.join(TASKS)}, not {self.task!r}")
        if not self.id or not self.artifact:
            raise ValueError("id: every model needs an id and an artifact")
        for name in ("replicas", "max_batch_size", "max_ongoing_requests", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests: {self.max_ongoing_requests} is below max_batch_size "
                             f"({self.max_batch_size}), so a replica could never fill a batch")
        if not self.num_cpus > 0 or min(self.num_gpus, self.batch_wait_s, self.stream_interval_s) < 0:
            raise ValueError("num_cpus: must be positive (num_gpus, batch_wait_s, stream_interval_s not negative)")


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1 << 20  # also the limit for a gRPC request message
    request_timeout_s: float = 60.0  # Helio's deadline for a model's answer (504); also Serve's proxy timeout

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s: must be positive")


@dataclass(frozen=True)
class GrpcConfig:
    port: int = 9000  # 0: no gRPC API

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")


@dataclass(frozen=True)
class ServeConfig:
    name: str = "serve_demo"  # the Serve application's name
    storage: str = "./runs"
    ray_address: str | None = None
    local_cpus: int | None = None
    http: HttpConfig = field(default_factory=HttpConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    models: tuple[ModelEntry, ...] = ()
    api_keys: tuple[str, ...] = ()  # also HELIO_API_KEYS (comma-separated); none: no auth
    max_items: int = 64  # inputs per embeddings / classify request
    ingress_cpus: float = 0.1
    ingress_max_ongoing_requests: int = 256  # requests one ingress replica holds at once
    ingress_max_queued_requests: int = 512  # waiting at the proxy before a 503 with Retry-After
    monitor: str | None = None  # a jobs.monitor config: start the app's monitor once it serves
    serve_seconds: float | None = None  # embedded cluster: None serves until interrupted; 0 answers the
    #                                     sample requests and stops (jobs.pipeline)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: name at least one model artifact to serve")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"models: model ids must be unique, got {ids}")


def entries(cfg: ServeConfig) -> list[dict[str, Any]]:
    """Each model's entry for the ingress (task, tokenizer, context), checked against its artifact."""
    from actors.model_loader import artifact_kind, check_servable

    store = Storage(cfg.storage)
    out = []
    for i, m in enumerate(cfg.models):
        art = store.open("model", m.artifact, verify=False)
        check_servable(art, m.force)
        hf = json.loads(art.read_bytes("config.json"))
        kind = artifact_kind(art).replace("lm", "generate")  # a GPT is served for generation
        if kind != m.task:
            raise ConfigError(f"models[{i}].task", f"artifact '{m.artifact}' is a {kind} model, not {m.task}")
        entry = {"id": m.id, "task": m.task, "artifact": m.artifact,
                 "tokenizer_json": art.read_bytes("tokenizer.json").decode(),
                 "context": hf.get("n_positions") or hf.get("max_position_embeddings"),
                 "labels": [hf["id2label"][str(j)] for j in range(len(hf.get("id2label") or {}))]}
        if m.canary is not None:
            new = store.open("model", m.canary.artifact, verify=False)
            check_servable(new, m.force)
            if artifact_kind(new) != artifact_kind(art) or new.read_bytes("tokenizer.json").decode() != \
                    entry["tokenizer_json"]:
                raise ConfigError(f"models[{i}].canary.artifact", f"'{m.canary.artifact}' is not a new version of "
                                  f"'{m.artifact}': a canary needs the same kind of model and the same tokenizer")
            entry["canary_artifact"] = m.canary.artifact
        out.append(entry)
    return out


def api_keys(cfg: ServeConfig) -> list[str]:
    """The config's keys and HELIO_API_KEYS' (comma-separated)."""
    return list(cfg.api_keys) + [k for k in os.environ.get("HELIO_API_KEYS", "").split(",") if k]


def build_app(cfg: ServeConfig):
    """The Serve application: one deployment per model, bound into the ingress."""
    from actors.finetune_data import special_id
    from actors.serve import Classifier, Embedder, Generator, threads_for
    from actors.serve_api import Api
    from tokenizers import Tokenizer

    models = entries(cfg)
    handles = {}
    for m, e in zip(cfg.models, models):
        opts = {"name": f"{e['task']}-{m.id}", "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
                "max_ongoing_requests": m.max_ongoing_requests, "max_queued_requests": m.max_queued_requests,
                "backpressure_config": BACKPRESSURE}
        if m.autoscaling is not None:
            opts["autoscaling_config"] = to_dict(m.autoscaling)
        else:
            opts["num_replicas"] = m.replicas
        if m.task != "generate":  # the batched encoders pad with the tokenizer's pad token
            pad = special_id(Tokenizer.from_str(e["tokenizer_json"]), ("<|pad|>", "[PAD]", "<pad>"))
            batch = (pad if pad is not None else 0, threads_for(m.num_cpus), m.max_batch_size, m.batch_wait_s)
        versions = [(m.id, opts["name"], m.artifact)]
        if m.canary is not None:
            versions.append((f"{m.id}@canary", f"{opts['name']}-canary", m.canary.artifact))
        for key, name, artifact in versions:
            args, dep = (cfg.storage, artifact, m.force), {**opts, "name": name}
            handles[key] = (
                Generator.options(**dep).bind(*args, threads_for(m.num_cpus), m.max_batch_size, m.stream_interval_s)
                if m.task == "generate" else Embedder.options(**dep).bind(*args, *batch) if m.task == "embed" else
                Classifier.options(**dep).bind(*args, *batch, e["labels"]))
    return Api.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}, backpressure_config=BACKPRESSURE,
                       max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                       max_queued_requests=cfg.ingress_max_queued_requests).bind(
        models, handles, api_keys(cfg), cfg.max_items, cfg.http.max_body_bytes, cfg.http.request_timeout_s,
        cfg.storage, cfg.name)


def app(args: dict[str, Any]):
    """The Serve builder (`serve run jobs.serve:app key=value ...`, or a Serve config's import_path):
    `args` are this job's config keys; `config` names a YAML file to start from."""
    return build_app(config_from_args(args))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    args = dict(args)
    path = args.pop("config", os.path.join(os.path.dirname(__file__), "configs", "serve_demo.yaml"))
    return load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()])


def proxy_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's HTTP and gRPC proxy settings (`serve.start`'s, a Serve config file's `http_options` and
    `grpc_options`). The proxy's timeout sits a little past Helio's own, which answers first."""
    out: dict[str, Any] = {"http_options": {"host": cfg.http.host, "port": cfg.http.port,
                                            "request_timeout_s": cfg.http.request_timeout_s + 5}}
    if cfg.grpc.port:
        out["grpc_options"] = {"port": cfg.grpc.port, "grpc_servicer_functions": list(GRPC_SERVICERS),
                               "request_timeout_s": cfg.http.request_timeout_s + 5}
    return out


def routing(cfg: ServeConfig) -> dict[str, Any]:
    """The routing file a deployment starts from: every canary at its configured share."""
    return {"models": {m.id: {"status": "canary", "share": m.canary.share, "promote_after": m.canary.promote_after,
                              "stable": m.artifact, "canary": m.canary.artifact, "since": time.time(), "reason": ""}
                       for m in cfg.models if m.canary is not None}}


def deploy(cfg: ServeConfig) -> str:
    """Starts Serve's proxies where the config says and deploys the application; returns its HTTP URL."""
    from ray import serve

    from actors.monitor import routing_path

    application = build_app(cfg)  # checks every artifact before anything starts
    store = Storage(cfg.storage)
    store.write_json(routing_path(cfg.name), {"models": {}})  # no canary gets traffic or probes while deploying
    serve.start(**proxy_options(cfg))
    serve.run(application, name=cfg.name, route_prefix="/")
    store.write_json(routing_path(cfg.name), routing(cfg))  # once every version serves
    return f"http://{cfg.http.host}:{cfg.http.port}"


def run(cfg: ServeConfig) -> str:
    from cluster.runtime import connect

    log.info(connect(cfg.ray_address, cfg.local_cpus))
    try:
        url = deploy(cfg)
    except RuntimeError as e:  # a deployment that failed to start (its replica raised in __init__)
        raise UserError(f"application '{cfg.name}' did not start: {str(e).splitlines()[0]}") from None
    rows = [(m.id, f"{m.task}: {m.artifact} ({m.replicas} replica(s))") for m in cfg.models]
    rows += [("HTTP", f"{url}/v1 (OpenAI-compatible), {url}/health")]
    if cfg.grpc.port:
        rows += [("gRPC", f"{cfg.http.host}:{cfg.grpc.port} (helio.v1.Helio, grpc.health.v1.Health)")]
    refs = record_references(cfg, url)
    rows += [("references", f"{len(refs['models'])} models' answers to their probes, for jobs.monitor")]
    print(format_summary(f"serving '{cfg.name}'", rows))
    print(samples(cfg, url), flush=True)
    if cfg.monitor:
        from jobs import monitor as monitor_job

        monitor_job.run(load_config(monitor_job.MonitorConfig, cfg.monitor, [
            f"storage={cfg.storage}", f"app={cfg.name}", "monitor_seconds=0"]))
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return url
    if cfg.serve_seconds is None:
        print("serving until interrupted (Ctrl-C)", flush=True)
    time.sleep(cfg.serve_seconds if cfg.serve_seconds is not None else float("inf"))
    return url


PROBE = {"generate": ("/v1/completions", {"prompt": "def read(path):\n    ", "max_tokens": 16, "temperature": 0}),
         "embed": ("/v1/embeddings", {"input": ["read a file line by line", "sort a list of numbers",
                                               "open a socket and send bytes"]}),
         "classify": ("/v1/classify", {"input": ["read a file line by line", "sort a list of numbers",
                                                "open a socket and send bytes"]})}


def record_references(cfg: ServeConfig, url: str) -> dict[str, Any]:
    """What every model answers to its fixed probe right after deployment (greedy text, embedding
    vectors, labels), written to storage for jobs.monitor's semantic probes."""
    from actors.monitor import references_path

    doc: dict[str, Any] = {"app": cfg.name, "recorded": time.time(), "http": url,
                           "grpc": f"{cfg.http.host}:{cfg.grpc.port}" if cfg.grpc.port else None, "models": {}}
    for m in cfg.models:
        path, body = PROBE[m.task]
        answer = post(url + path, {"model": m.id, **body}, api_keys(cfg))
        expected = (answer["choices"][0]["text"] if m.task == "generate" else
                    [d["embedding"] for d in answer["data"]] if m.task == "embed" else
                    [d["label"] for d in answer["data"]])
        doc["models"][m.id] = {"task": m.task, "artifact": m.artifact, "deployment": f"{m.task}-{m.id}",
                               "path": path, "request": {"model": m.id, **body}, "expected": expected}
    Storage(cfg.storage).write_json(references_path(cfg.name), doc)
    return doc


def post(url: str, body: dict, keys: list[str], timeout: float = 120) -> dict:
    """One JSON POST as a client sends it (with the first API key, if any); the JSON answer."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    if keys:
        req.add_header("authorization", f"Bearer {keys[0]}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


SAMPLE = {"generate": ("/v1/completions", {"prompt": "def read(path):\n    ", "max_tokens": 40,
                                           "temperature": 0.8, "top_k": 50, "seed": 0}),
          "embed": ("/v1/embeddings", {"input": "read a file line by line"}),
          "classify": ("/v1/classify", {"input": "read a file line by line"})}


def samples(cfg: ServeConfig, url: str) -> str:
    """One request per hosted model over HTTP, as a client would send it, and what came back."""
    keys = api_keys(cfg)
    lines = []
    for m in cfg.models:
        path, body = SAMPLE[m.task]
        answer = post(url + path, {"model": m.id, **body}, keys)
        if m.task == "generate":
            shown = repr(body["prompt"] + answer["choices"][0]["text"])
        elif m.task == "embed":
            v = answer["data"][0]["embedding"]
            shown = f"{len(v)} floats [{', '.join(f'{x:.4f}' for x in v[:4])}, ...]"
        else:
            shown = f"{answer['data'][0]['label']} {answer['data'][0]['probabilities']}"
        lines.append(f"POST {path} {json.dumps({'model': m.id, **body})}\n  -> {shown}")
    if cfg.grpc.port:
        lines.append(f"gRPC {cfg.http.host}:{cfg.grpc.port} grpc.health.v1.Health/Check -> {grpc_health(cfg)}")
    return "\n".join(["", "sample requests over HTTP and gRPC:"] + lines)


def grpc_health(cfg: ServeConfig, service: str = "") -> str:
    """The standard gRPC health check against the application (SERVING when every model answers)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{cfg.http.host}:{cfg.grpc.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         metadata=(("application", cfg.name),), timeout=60)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


CONFIG_CLASS = ServeConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.serve", __doc__, ServeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
