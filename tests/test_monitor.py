"""jobs.monitor on a real local Ray Serve: a model that stops answering turns unhealthy and is alerted
once, the monitor survives being killed with its history, and recovery is reported when the model
is back. The webhook is a real HTTP server on 127.0.0.1 that counts what it receives."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from actors.model_loader import open_runnable
from cluster.config import load_config
from cluster.storage import Storage
from jobs import monitor as monitor_job
from jobs import serve as serve_job
from models.gpt import GPT
from models.hf import save_model
from tiny_data import free_port, write_model_artifact
from waiting import metric, poll, ray_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs each component once in make test-fast


class Receiver(BaseHTTPRequestHandler):
    alerts: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server API
        Receiver.alerts.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def watched(serve_ports, tiny_store):
    """A served app (the session store's GPT and encoder) with references, a webhook receiver and a
    running monitor; yields the configs."""
    store = tiny_store
    root = store.root
    tok = store.open("model", "tiny_gpt").read_bytes("tokenizer.json").decode()
    gpt = open_runnable(store, "tiny_gpt")[0]
    write_model_artifact(store, "monitor_gpt_copy", lambda d: save_model(gpt, d), tok)  # a good new version
    torch.manual_seed(1)
    bad = GPT(gpt.cfg).eval()  # a broken new version: other weights, so other answers
    write_model_artifact(store, "monitor_gpt_bad", lambda d: save_model(bad, d), tok)
    serve_cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={root}", "name=mon_app", f"http.port={serve_ports['http']}", f"grpc.port={serve_ports['grpc']}",
        "models=[{id: gpt, artifact: tiny_gpt, num_cpus: 0.2}, {id: emb, artifact: tiny_enc, task: embed, num_cpus: 0.2}]"])
    url = serve_job.deploy(serve_cfg)
    serve_job.record_references(serve_cfg, url)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    mon_cfg = load_config(monitor_job.MonitorConfig, None, [
        f"storage={root}", "app=mon_app", "period_s=0.5", "timeout_s=5", "fail_after=2", "recover_after=2",
        f"webhook.url=http://127.0.0.1:{receiver.server_port}/alerts", "webhook.cooldown_s=0", "restart=true"])
    monitor_job.start(mon_cfg)  # every test finds the monitor running, whatever ran before it
    yield serve_cfg, mon_cfg
    import ray
    from ray import serve

    from actors.monitor import NAMESPACE, actor_name

    ray.kill(ray.get_actor(actor_name("mon_app"), namespace=NAMESPACE), no_restart=True)
    receiver.shutdown()
    serve.delete(serve_cfg.name)


def test_down_is_unhealthy_and_alerted_once_the_monitor_survives_a_kill_and_recovery_is_reported(watched):
    import ray
    from ray import serve

    serve_cfg, mon_cfg = watched
    serve_job.deploy(serve_cfg)  # the app and the monitor as the fixture made them, whatever ran before
    monitor_job.start(mon_cfg)
    status = monitor_job.run(dataclasses.replace(mon_cfg, monitor_seconds=0))
    assert set(status["models"]) >= {"gpt", "emb"}
    actor = monitor_job.start(dataclasses.replace(mon_cfg, restart=False))  # the running one
    states = lambda: {m: h["state"] for m, h in ray.get(actor.status.remote())["models"].items()  # noqa: E731
                      if m in ("gpt", "emb")}
    rounds = lambda: len(ray.get(actor.status.remote())["models"]["gpt"]["rounds"])  # noqa: E731
    poll(states, lambda s: s == {"gpt": "healthy", "emb": "healthy"})
    healthy = ray.get(actor.status.remote())
    for h in healthy["models"].values():  # every probe ran and passed against the references
        assert {p["probe"] for p in h["rounds"][-1]["probes"]} == {"http", "grpc", "serve_status", "semantic",
                                                                    "performance"}
        assert all(p["ok"] for p in h["rounds"][-1]["probes"]), h["rounds"][-1]

    serve.delete("mon_app")  # both models stop answering
    poll(states, lambda s: s == {"gpt": "unhealthy", "emb": "unhealthy"}, timeout_s=60)
    # The deletion's incidents: each model's newest. (A loaded machine may have had a blip of its own
    # before, with an incident and alerts of its own; only these incidents are this test's.)
    incident = {m: h["incidents"][-1]["id"] for m, h in ray.get(actor.status.remote())["models"].items()
                if m in ("gpt", "emb")}
    ours = lambda: [a for a in Receiver.alerts if a["incident"]["id"] in incident.values()]  # noqa: E731
    n = rounds()
    poll(rounds, lambda r: r >= n + 3)  # a few more failing rounds: still one alert per incident
    down = poll(ours, lambda a: len(a) >= 2)
    assert sorted((a["deployment"], a["to"], a["from"]) for a in down) == [
        ("emb", "unhealthy", "healthy"), ("gpt", "unhealthy", "healthy")], down

    before = ray.get(actor.status.remote())
    pid = before["pid"]
    ray.kill(actor, no_restart=False)  # the monitor dies; Ray restarts it and it reloads its state
    after = poll(lambda: ray.get(actor.status.remote(), timeout=30), lambda s: s["pid"] != pid, timeout_s=60)
    assert after["starts"] == before["starts"] + 1
    assert after["models"]["gpt"]["incidents"][-1]["id"] == incident["gpt"]
    last = after["models"]["gpt"]["rounds"][-1]["time"]
    poll(lambda: ray.get(actor.status.remote())["models"]["gpt"]["rounds"][-1]["time"], lambda t: t > last + 1)

    url = serve_job.deploy(serve_cfg)  # the models are back
    poll(states, lambda s: s == {"gpt": "healthy", "emb": "healthy"}, timeout_s=90)
    up = [a for a in poll(ours, lambda a: len(a) >= 4) if a["to"] == "healthy"]
    assert sorted(a["deployment"] for a in up) == ["emb", "gpt"]
    assert {a["deployment"]: a["incident"]["id"] for a in up} == incident
    assert all(a["incident"]["closed"] for a in up)
    n = rounds()
    poll(rounds, lambda r: r >= n + 3)  # more healthy rounds after the restart: nothing more is sent
    assert len(ours()) == 4, ours()  # no duplicates from the restart or the extra failing rounds
    assert urllib.request.urlopen(url + "/health", timeout=30).status == 200


def test_probe_metrics_reach_rays_metrics_endpoint(watched):
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "cluster" / "grafana" /
                            "helio_monitor.json").read_text())
    plotted = {name for p in dashboard["panels"] for t in p["targets"]
               for name in re.findall(r"ray_helio_[a-z_]+", t["expr"])}
    assert len(plotted) == 4
    text = poll(ray_metrics, lambda t: all(name in t for name in plotted), timeout_s=120, every=2)  # every plotted metric
    assert metric(text, "ray_helio_probes_total", probe="semantic", result="pass") > 0, text[:2000]


def completions(url: str, n: int) -> list[dict]:
    req = {"model": "gpt", "prompt": "def read(path):\n    ", "max_tokens": 16, "temperature": 0}
    return [serve_job.post(url + "/v1/completions", req, []) for _ in range(n)]


def test_a_bad_canary_is_rolled_back_and_a_good_one_promoted(watched):
    import ray

    from actors.monitor import routing_path

    serve_cfg, mon_cfg = watched
    store = Storage(serve_cfg.storage)
    reference = store.read_json(f"serving/{serve_cfg.name}/references.json")["models"]["gpt"]["expected"]
    actor = monitor_job.start(dataclasses.replace(mon_cfg, restart=False))
    route = lambda: store.read_json(routing_path("mon_app"))["models"]["gpt"]  # noqa: E731

    def with_canary(artifact: str):
        models = [dataclasses.replace(m, canary=serve_job.Canary(artifact, share=0.5, promote_after=3))
                  if m.id == "gpt" else m for m in serve_cfg.models]
        return dataclasses.replace(serve_cfg, models=tuple(models))

    url = serve_job.deploy(with_canary("monitor_gpt_bad"))
    assert route()["status"] == "canary"
    rolled = poll(route, lambda r: r["status"] != "canary", timeout_s=60)
    assert rolled["status"] == "rolled_back" and rolled["share"] == 0.0
    assert "monitor_gpt_bad unhealthy" in rolled["reason"] and "semantic: greedy completion" in rolled["reason"]
    answers = poll(lambda: completions(url, 12),  # the ingress rereads the routing within a second
                   lambda ans: {a["system_fingerprint"] for a in ans} == {"helio:stable:tiny_gpt"}, timeout_s=30)
    assert all(a["choices"][0]["text"] == reference for a in answers)
    status = ray.get(actor.status.remote())
    assert status["models"]["gpt@canary"]["incidents"][-1]["action"] == "rolled back to tiny_gpt"
    assert any(a["to"] == "rolled_back" and a["deployment"] == "gpt@canary" for a in Receiver.alerts)

    url = serve_job.deploy(with_canary("monitor_gpt_copy"))
    promoted = poll(route, lambda r: r["status"] != "canary", timeout_s=60)
    assert promoted["status"] == "promoted" and promoted["share"] == 1.0, promoted
    answers = poll(lambda: completions(url, 6),
                   lambda ans: {a["system_fingerprint"] for a in ans} == {"helio:canary:monitor_gpt_copy"}, timeout_s=30)
    assert all(a["choices"][0]["text"] == reference for a in answers)
    assert "gpt rollout" in monitor_job.format_status(ray.get(actor.status.remote()))

    from jobs import rollout

    assert rollout.main(["--set", f"storage={serve_cfg.storage}", "--set", "app=mon_app", "--set", "model=gpt",
                         "--set", "action=rollback"]) == 0  # by hand
    poll(lambda: completions(url, 4), lambda ans: {a["system_fingerprint"] for a in ans} == {"helio:stable:tiny_gpt"},
         timeout_s=30)
    assert rollout.main(["--set", f"storage={serve_cfg.storage}", "--set", "app=mon_app", "--set", "model=emb",
                         "--set", "action=promote"]) == 2  # no canary to promote


def test_a_failing_webhook_is_counted_and_never_stops_the_monitor(watched):
    import ray

    from actors.monitor import routing_path

    serve_cfg, mon_cfg = watched
    actor = monitor_job.start(dataclasses.replace(mon_cfg, webhook=monitor_job.Webhook(
        url=f"http://127.0.0.1:{free_port()}/nobody-listens", cooldown_s=0)))  # restart=true: new settings
    models = [dataclasses.replace(m, canary=serve_job.Canary("monitor_gpt_bad", share=0.5, promote_after=3))
              if m.id == "gpt" else m for m in serve_cfg.models]
    serve_job.deploy(dataclasses.replace(serve_cfg, models=tuple(models)))  # a canary to roll back: an alert
    store = Storage(serve_cfg.storage)
    poll(lambda: store.read_json(routing_path("mon_app"))["models"]["gpt"]["status"], lambda s: s == "rolled_back",
         timeout_s=60)
    failed = poll(lambda: ray.get(actor.status.remote()), lambda s: s["webhook_failures"] >= 1, timeout_s=30)
    last = failed["models"]["emb"]["rounds"][-1]["time"]  # and it keeps probing
    poll(lambda: ray.get(actor.status.remote())["models"]["emb"]["rounds"][-1]["time"], lambda t: t > last + 1)
