"""A Serve application of model artifacts: its config, and the application built from it.

`ServeConfig` (jobs.serve's config, the pipeline's `serve` section) lists the models; `build_app`
checks each against its artifact and binds one deployment per model version
(actors/serve_deployments.py) into the ingress (actors/serve_api.py). `proxy_options` are Serve's
HTTP and gRPC proxy settings for it, `routing` the canary routing file a deployment starts from.
jobs.serve deploys what is built here; actors/serve_client.py talks to it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from actors.serve_limits import Limits
from cluster.config import ConfigError, to_dict
from cluster.runtime import JobConfig
from cluster.storage import Storage

# What a served model answers (a model entry's `task`): which of the ingress's endpoints reach it.
ENDPOINT_KINDS = ("generate", "embed", "classify")
# A generator's engine: Helio's own (CPU, and GPUs for small models) or vLLM on Ray Serve's LLM support
# (actors/serve_vllm.py; the vllm extra on GPU nodes, make vllm-env's CPU build elsewhere).
ENGINES = ("helio", "vllm")
BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}  # a request over max_queued_requests
# A stopping replica checks whether its last requests are done this often (Serve's default, 2 s, is
# the least time any redeploy, rollback or deletion takes).
DRAIN_POLL_S = 0.2
GRPC_SERVICERS = ("actors.serve_requests.add_helio_servicer",  # the generated one, decoding failures answered
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
    drain_s: float = 20.0  # a stopping replica's time to finish its requests before it is killed (Serve's
    #                        graceful_shutdown_timeout_s; also how long deleting a never-placed replica takes)
    max_context: int = 0  # tokens per request, prompt and reply; 0: the model's own (a 128k checkpoint's KV
    #                       cache is max_batch_size x this, so cap it to what the replica's memory holds)
    draft_tokens: int = 4  # generate: prompt-lookup drafts a greedy request checks per decode step (0: none)
    engine: str = "helio"  # generate: helio | vllm (num_gpus is then vLLM's tensor-parallel size, or 0: CPU)

    def __post_init__(self) -> None:
        if self.task not in ENDPOINT_KINDS:
            raise ValueError(f"task: must be one of {', '.join(ENDPOINT_KINDS)}, not {self.task!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "vllm" and self.task != "generate":
            raise ValueError(f"engine: vllm generates text; a {self.task} model is served by Helio's engine")
        if self.engine == "vllm" and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus: vLLM takes whole GPUs (its tensor-parallel size), not {self.num_gpus}")
        if not self.id or not self.artifact:
            raise ValueError("id: every model needs an id and an artifact")
        for name in ("replicas", "max_batch_size", "max_ongoing_requests", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests: {self.max_ongoing_requests} is below max_batch_size "
                             f"({self.max_batch_size}), so a replica could never fill a batch")
        if self.max_context < 0 or self.max_context == 1:
            raise ValueError(f"max_context: must be 0 (the model's own) or at least 2 tokens, not {self.max_context}")
        if not self.num_cpus > 0 or min(self.num_gpus, self.batch_wait_s, self.stream_interval_s) < 0:
            raise ValueError("num_cpus: must be positive (num_gpus, batch_wait_s, stream_interval_s not negative)")
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens: must not be negative (0 turns drafting off), not {self.draft_tokens}")
        if self.drain_s < 0:
            raise ValueError(f"drain_s: must not be negative, not {self.drain_s}")


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1 << 20  # also the limit for a gRPC request message
    max_image_pixels: int = 1 << 24  # an image classifier's input: width x height over it is a 413
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
class ServeConfig(JobConfig):
    """jobs.serve's config (the pipeline's `serve` section): the application and how long to serve it."""
    name: str = "serve_demo"  # the Serve application's name
    route_prefix: str = "/"  # where its HTTP routes start (another app on the same cluster takes another prefix)
    http: HttpConfig = field(default_factory=HttpConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    models: tuple[ModelEntry, ...] = ()
    api_keys: tuple[str, ...] = ()  # also HELIO_API_KEYS (comma-separated) and api_key_file
    api_key_file: str = ""  # a file of keys, one per line (a mounted secret), read by the ingress where it runs
    auth: str = "keys"  # keys: a non-loopback http.host needs keys; none: serve everyone anywhere (warned)
    limits: Limits = field(default_factory=Limits)  # per-key requests/s and tokens/min (none by default)
    max_items: int = 64  # inputs per embeddings / classify request
    ingress_cpus: float = 0.1
    ingress_max_ongoing_requests: int = 256  # requests one ingress replica holds at once
    ingress_max_queued_requests: int = 512  # waiting at the proxy before a 503 with Retry-After
    monitor: str | None = None  # a jobs.monitor config: start the app's monitor once it serves
    start_timeout_s: float = 600.0  # every replica serving by then (an autoscaling cluster adds nodes
    #                                 meanwhile), or the app is deleted and the job fails saying why
    serve_seconds: float | None = None  # embedded cluster: None serves until interrupted; 0 answers the
    #                                     sample requests and stops (jobs.pipeline)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: name at least one model artifact to serve")
        ids = [m.id for m in self.models]
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s: must be positive, got {self.start_timeout_s}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"models: model ids must be unique, got {ids}")
        if not self.route_prefix.startswith("/") or (self.route_prefix != "/" and self.route_prefix.endswith("/")):
            raise ValueError(f"route_prefix: {self.route_prefix!r} must start with / and not end with one (or be /)")
        if self.auth not in ("keys", "none"):
            raise ValueError(f"auth: {self.auth!r} is not keys or none")
        if self.auth == "keys" and not loopback(self.http.host) and not (
                self.api_keys or env_keys() or self.api_key_file):
            raise ValueError(f"http.host: {self.http.host} is reachable from other machines and no API key is set "
                             f"(api_keys, HELIO_API_KEYS or api_key_file); set one, or auth: none to serve everyone")


def app_url(cfg: ServeConfig) -> str:
    """The application's HTTP base URL: its routes (/v1/...) follow it."""
    return f"http://{cfg.http.host}:{cfg.http.port}" + ("" if cfg.route_prefix == "/" else cfg.route_prefix)


def loopback(host: str) -> bool:
    """Whether `host` binds this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any address
        return False


def env_keys() -> list[str]:
    return [k for k in os.environ.get("HELIO_API_KEYS", "").split(",") if k]


def _check_device(where: str, m: ModelEntry, name: str, art) -> None:
    """Refuses a quantized artifact on GPU replicas: Helio has no CUDA integer kernels wired in."""
    from models.quant import QUANT_CONFIG

    if m.num_gpus and QUANT_CONFIG in art.files():
        method = json.loads(art.read_bytes(QUANT_CONFIG)).get("method", "quantized")
        raise ConfigError(where, f"artifact '{name}' is {method}-quantized and Helio has no CUDA integer kernels "
                          "wired in (a GPU would run a dequantized copy: more memory than the float model and no "
                          "faster); serve it on CPU replicas (num_gpus: 0), or serve the float model on the GPU")


def _require_vllm(where: str) -> None:
    """`engine: vllm` needs vLLM where the app is built (and on the nodes that serve it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(where, "vllm is not installed in this environment: install Helio's vllm extra on the "
                          "GPU nodes (pip install -e '.[vllm]'; make vllm-env builds vLLM's CPU build), or serve "
                          "with engine: helio")


def _check_vllm(where: str, name: str, art, num_gpus: float) -> None:
    """vLLM serves float checkpoints (it does not read Helio's own quantized format), and on CPU only
    those its CPU attention kernels cover."""
    from actors.serve_vllm import cpu_refusal
    from models.quant import QUANT_CONFIG

    if QUANT_CONFIG in art.files():
        method = json.loads(art.read_bytes(QUANT_CONFIG)).get("method", "quantized")
        raise ConfigError(where, f"artifact '{name}' is {method}-quantized in Helio's own format, which vLLM does "
                          "not read: serve it with engine: helio, or serve the float model with vllm")
    if not num_gpus and (why := cpu_refusal(json.loads(art.read_bytes("config.json")))):
        raise ConfigError(where, f"artifact '{name}': {why}; serve it with engine: helio, or on GPUs (num_gpus)")


def entries(cfg: ServeConfig) -> list[dict[str, Any]]:
    """Each model's entry for the ingress (task, tokenizer, context), checked against its artifact."""
    from actors.chat import tokenizer_files
    from actors.model_loader import VISION_TYPES, artifact_kind, check_servable

    store = Storage(cfg.storage)
    out = []
    for i, m in enumerate(cfg.models):  # before any artifact is read
        if m.engine == "vllm":
            _require_vllm(f"models[{i}].engine")
    for i, m in enumerate(cfg.models):
        art = store.open("model", m.artifact, verify=False)
        check_servable(art, m.force)
        if m.engine == "vllm":
            _check_vllm(f"models[{i}].engine", m.artifact, art, m.num_gpus)
        _check_device(f"models[{i}].num_gpus", m, m.artifact, art)
        hf = json.loads(art.read_bytes("config.json"))
        kind = artifact_kind(art).replace("lm", "generate")  # a GPT is served for generation
        if kind != m.task:
            raise ConfigError(f"models[{i}].task", f"artifact '{m.artifact}' is a {kind} model, not {m.task}")
        if hf.get("model_type") in VISION_TYPES:  # an image classifier: no tokenizer, pixels in
            if m.canary is not None:
                raise ConfigError(f"models[{i}].canary", "canary rollouts of image classifiers are not supported yet")
            out.append({"id": m.id, "task": m.task, "artifact": m.artifact, "modality": "image", "context": None,
                        "image_size": hf.get("helio_image_size") or hf.get("image_size"),
                        "channels": hf.get("num_channels", 3),
                        "labels": [hf["id2label"][str(j)] for j in range(len(hf["id2label"]))]})
            continue
        entry = {"id": m.id, "task": m.task, "artifact": m.artifact,
                 "tokenizer_files": tokenizer_files(art),  # with a checkpoint's chat template and eos ids
                 "context": min(own := hf.get("n_positions") or hf.get("max_position_embeddings"),
                                m.max_context or own),
                 "labels": [hf["id2label"][str(j)] for j in range(len(hf.get("id2label") or {}))]}
        if m.canary is not None:
            new = store.open("model", m.canary.artifact, verify=False)
            check_servable(new, m.force)
            if m.engine == "vllm":
                _check_vllm(f"models[{i}].engine", m.canary.artifact, new, m.num_gpus)
            _check_device(f"models[{i}].num_gpus", m, m.canary.artifact, new)
            if artifact_kind(new) != artifact_kind(art) or tokenizer_files(new) != entry["tokenizer_files"]:
                raise ConfigError(f"models[{i}].canary.artifact", f"'{m.canary.artifact}' is not a new version of "
                                  f"'{m.artifact}': a canary needs the same kind of model and the same tokenizer")
            entry["canary_artifact"] = m.canary.artifact
        out.append(entry)
    return out


def api_keys(cfg: ServeConfig) -> list[str]:
    """The config's keys and HELIO_API_KEYS' (comma-separated); api_key_file's are read by the ingress."""
    return list(cfg.api_keys) + env_keys()


def build_app(cfg: ServeConfig):
    """The Serve application: one deployment per model, bound into the ingress."""
    from actors.chat import ChatFormat
    from actors.serve_api import Api
    from actors.serve_deployments import Classifier, Embedder, Generator, ImageClassifier, threads_for

    models = entries(cfg)
    handles = {}
    for m, e in zip(cfg.models, models):
        opts = {"name": f"{e['task']}-{m.id}", "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
                "max_ongoing_requests": m.max_ongoing_requests, "max_queued_requests": m.max_queued_requests,
                "backpressure_config": BACKPRESSURE, "graceful_shutdown_timeout_s": m.drain_s,
                "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}
        if m.autoscaling is not None:
            opts["autoscaling_config"] = to_dict(m.autoscaling)
        else:
            opts["num_replicas"] = m.replicas
        if m.task != "generate" and e.get("modality") != "image":  # the batched encoders pad with the pad token
            batch = (ChatFormat(e["tokenizer_files"]).pad_id, threads_for(m.num_cpus), m.max_batch_size, m.batch_wait_s)
        versions = [(m.id, opts["name"], m.artifact)]
        if m.canary is not None:
            versions.append((f"{m.id}@canary", f"{opts['name']}-canary", m.canary.artifact))
        for key, name, artifact in versions:
            args, dep = (cfg.storage, artifact, m.force), {**opts, "name": name}
            if m.engine == "vllm":
                handles[key] = vllm_generator(dep, args, key, m, e["context"])
                continue
            handles[key] = (
                Generator.options(**dep).bind(*args, threads_for(m.num_cpus), m.max_batch_size, m.stream_interval_s,
                                              e["context"], m.draft_tokens)
                if m.task == "generate" else Embedder.options(**dep).bind(*args, *batch) if m.task == "embed" else
                ImageClassifier.options(**dep).bind(*args, threads_for(m.num_cpus), m.max_batch_size, m.batch_wait_s,
                                                    e["labels"], e["image_size"], e["channels"])
                if e.get("modality") == "image" else Classifier.options(**dep).bind(*args, *batch, e["labels"]))
    return Api.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}, backpressure_config=BACKPRESSURE,
                       graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
                       max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                       max_queued_requests=cfg.ingress_max_queued_requests).bind(
        models, handles, api_keys(cfg), cfg.max_items, cfg.http.max_body_bytes, cfg.http.request_timeout_s,
        cfg.storage, cfg.name, cfg.api_key_file, cfg.auth, to_dict(cfg.limits), cfg.http.max_image_pixels)


def vllm_generator(opts: dict[str, Any], args: tuple, model_id: str, m: ModelEntry, context: int):
    """A model version on vLLM (actors/serve_vllm.py), in the placement group Ray Serve LLM sizes for it."""
    from ray import serve

    from actors.serve_deployments import threads_for
    from actors.serve_vllm import VLLMGenerator, deployment_options

    return serve.deployment(VLLMGenerator).options(**deployment_options(opts, m.num_cpus, m.num_gpus)).bind(
        *args, model_id, m.num_cpus, m.num_gpus, threads_for(m.num_cpus), m.max_batch_size, context,
        m.stream_interval_s)


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
