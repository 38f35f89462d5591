"""Helio's serving API from a client's side: one JSON POST, a sample request to every model, the gRPC
health check, and the references the monitor's semantic probes compare against.

jobs.serve records the references right after it deploys and prints the samples; jobs.query sends
the samples to an application that is already up.
"""

from __future__ import annotations

import json
import time
from typing import Any

from actors.serve_app import ServeConfig, api_keys
from cluster.storage import Storage

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
        path, body = request_for(cfg, m, PROBE)
        answer = post(url + path, {"model": m.id, **body}, api_keys(cfg))
        expected = (answer["choices"][0]["text"] if m.task == "generate" else
                    [d["embedding"] for d in answer["data"]] if m.task == "embed" else
                    [d["label"] for d in answer["data"]])
        doc["models"][m.id] = {"task": m.task, "artifact": m.artifact, "deployment": f"{m.task}-{m.id}",
                               "path": path, "request": {"model": m.id, **body}, "expected": expected}
    Storage(cfg.storage).write_json(references_path(cfg.name), doc)
    return doc


def request_for(cfg: ServeConfig, m: Any, table: dict[str, tuple[str, dict]]) -> tuple[str, dict]:
    """The probe or sample request (path, body) for a model entry; an image classifier's inputs are known
    images (actors/serve_images.py), not texts."""
    if m.task == "classify" and is_image_model(cfg, m.artifact):
        from actors.serve_images import probe_images

        images = probe_images()
        return "/v1/classify", {"input": images if table is PROBE else images[0]}
    return table[m.task]


def is_image_model(cfg: ServeConfig, artifact: str) -> bool:
    from actors.model_loader import VISION_TYPES

    art = Storage(cfg.storage).open("model", artifact, verify=False)
    return json.loads(art.read_bytes("config.json")).get("model_type") in VISION_TYPES


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
        path, body = request_for(cfg, m, SAMPLE)
        answer = post(url + path, {"model": m.id, **body}, keys)
        if m.task == "generate":
            shown = repr(body["prompt"] + answer["choices"][0]["text"])
        elif m.task == "embed":
            v = answer["data"][0]["embedding"]
            shown = f"{len(v)} floats [{', '.join(f'{x:.4f}' for x in v[:4])}, ...]"
        else:
            shown = f"{answer['data'][0]['label']} {answer['data'][0]['probabilities']}"
        sent = {"model": m.id, **body}
        if m.task == "classify" and is_image_model(cfg, m.artifact):
            sent["input"] = f"<{len(body['input'])} base64 characters: a PNG of the glyph 0>"
        lines.append(f"POST {cfg.route_prefix.rstrip('/')}{path} {json.dumps(sent)}\n  -> {shown}")
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
