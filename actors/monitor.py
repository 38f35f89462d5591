"""The monitor: one detached, named Ray actor per watched Serve application that probes every hosted
model on its own schedule, keeps each one's health (actors/health.py), exports metrics, and alerts.

Probes per model, each with pass/fail, latency and reason, every `period_s`, each under `timeout_s`:
- liveness: HTTP GET /health lists the model; the gRPC health service answers SERVING for it;
  Serve's own status of its deployment is HEALTHY;
- semantic: the model's answer to its fixed probe against the reference jobs.serve recorded when the
  version was deployed: the same greedy text, embeddings at cosine >= `min_cosine`, the same labels
  on the canary texts at the recorded rate;
- performance: rolling p50 / p99 latency and error rate of the semantic probe against the SLOs.

The actor restarts itself (`max_restarts=-1`) and reloads its state (health, incidents, sent alerts)
from storage, where it writes it after every round. Metrics go through `ray.util.metrics` to Ray's
Prometheus endpoint; alerts go to the log as one JSON line each and, optionally, to a webhook. What
it carries on from (a probe that raised, an unreadable file, a failing webhook) is logged and
counted, never fatal. The driver's side (start the actor, wait for a round, print its status) and
the config are at the end, for jobs.monitor, jobs.status and jobs.serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from actors.health import STATES, Alerts, Health, ProbeResult
from cluster.cli import UserError, format_summary
from cluster.config import to_dict
from cluster.runtime import JobConfig
from cluster.storage import Storage

log = logging.getLogger("helio.monitor")
NAMESPACE = "helio"


def actor_name(app: str) -> str:
    return f"helio-monitor-{app}"


def state_path(app: str) -> str:
    return f"monitor/{app}/state.json"


def routing_path(app: str) -> str:
    """Each model's canary rollout: share of traffic, status (canary, promoted, rolled_back), reason."""
    return f"serving/{app}/routing.json"


def references_path(app: str) -> str:
    """Where jobs.serve records what each model answered when its version was deployed."""
    return f"serving/{app}/references.json"


@dataclass(frozen=True)
class Slo:
    """What the performance probe holds the semantic probe's rolling window to."""
    p50_ms: float = 1000.0
    p99_ms: float = 5000.0
    error_rate: float = 0.2
    window: int = 20  # rounds

    def __post_init__(self) -> None:
        if not (self.p50_ms > 0 and self.p99_ms > 0 and 0 <= self.error_rate <= 1 and self.window >= 1):
            raise ValueError("p50_ms: latencies must be positive, error_rate in [0, 1], window >= 1")


@dataclass(frozen=True)
class Webhook:
    url: str | None = None  # POSTed one JSON object per alert
    cooldown_s: float = 300.0  # per model, except recoveries

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: {self.url!r} is not an http(s) URL")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s: must not be negative")


@dataclass(frozen=True)
class MonitorConfig(JobConfig):
    """jobs.monitor's and jobs.status's config (the pipeline's `monitor` section)."""
    name: str = "monitor_demo"
    app: str = "serve_demo"  # the Serve application jobs.serve deployed (its config's `name`)
    period_s: float = 10.0
    timeout_s: float = 5.0  # per probe
    fail_after: int = 3  # consecutive failing (or slow) rounds -> unhealthy (or degraded)
    recover_after: int = 2  # consecutive good rounds -> healthy
    min_cosine: float = 0.999  # embeddings against the recorded ones
    history: int = 100  # rounds kept per model
    slo: Slo = field(default_factory=Slo)
    webhook: Webhook = field(default_factory=Webhook)
    api_keys: tuple[str, ...] = ()  # the application's key for the semantic probes (or HELIO_API_KEYS)
    restart: bool = False  # replace a running monitor of the same app (to change its settings)
    monitor_seconds: float | None = None  # embedded: None watches until interrupted; 0 returns after a round

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and self.timeout_s > 0):
            raise ValueError("period_s: period_s and timeout_s must be positive")
        if self.fail_after < 1 or self.recover_after < 1 or self.history < 1:
            raise ValueError("fail_after: fail_after, recover_after and history must be at least 1")
        if not 0 < self.min_cosine <= 1:
            raise ValueError("min_cosine: must be in (0, 1]")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def semantic_check(task: str, expected: Any, answer: dict, min_cosine: float) -> str:
    """'' when the answer matches the reference, else why not."""
    if task == "generate":
        text = answer["choices"][0]["text"]
        return "" if text == expected else f"greedy completion {text[:40]!r} differs from {expected[:40]!r}"
    if task == "embed":
        worst = min(cosine(d["embedding"], e) for d, e in zip(answer["data"], expected))
        return "" if worst >= min_cosine else f"embedding cosine {worst:.4f} to the reference < {min_cosine}"
    right = sum(d["label"] == e for d, e in zip(answer["data"], expected)) / len(expected)
    return "" if right >= 1.0 else f"canary labels right {right:.0%}, recorded 100%"


def set_rollout(store: Storage, app: str, model_id: str, status: str, reason: str) -> dict:
    """Promotes (all traffic to the canary) or rolls back (none) a model's canary in the routing file
    the ingress reads; returns the model's new routing."""
    routing = store.read_json(routing_path(app)) or {"models": {}}
    route = routing["models"].get(model_id)
    if route is None:
        raise ValueError(f"model '{model_id}' of application '{app}' has no canary rollout")
    route.update(status=status, share=1.0 if status == "promoted" else 0.0, reason=reason, since=time.time())
    store.write_json(routing_path(app), routing)
    return route


class Probes:
    """One version's probes (a model's stable version, or its canary during a rollout, held to the
    stable version's references) and the rolling window its performance probe reads."""

    def __init__(self, model_id: str, version: str, settings: dict[str, Any], headers: dict[str, str],
                 caught: Callable[..., None] | None = None):
        self.id, self.version, self.s = model_id, version, settings
        self.caught = caught or (lambda where, e, detail="": None)  # logs and counts a probe that raised
        self.key = model_id if version == "stable" else f"{model_id}@canary"
        self.headers = {**headers, "x-helio-version": version}
        self.window: list[tuple[float, bool]] = []  # (latency, ok) of the semantic probe

    async def run(self, session, ref: dict[str, Any], refs: dict[str, Any]) -> list[ProbeResult]:
        deployment = ref["deployment"] + ("-canary" if self.version == "canary" else "")
        probes = [self._timed("http", self._http(session, refs["http"])),
                  self._timed("serve_status", asyncio.to_thread(self._serve_status, refs["app"], deployment)),
                  self._timed("semantic", self._semantic(session, refs["http"], ref))]
        if refs.get("grpc"):
            probes.append(self._timed("grpc", self._grpc(refs["grpc"], refs["app"])))
        results = list(await asyncio.gather(*probes))
        semantic = next(r for r in results if r.probe == "semantic")
        self.window = (self.window + [(semantic.latency_s, semantic.ok)])[-self.s["slo"]["window"]:]
        return results + [self._performance()]

    async def _timed(self, name: str, probe) -> ProbeResult:
        t = time.perf_counter()
        try:
            reason = await asyncio.wait_for(probe, self.s["timeout_s"])
        except TimeoutError:
            reason = f"no answer within {self.s['timeout_s']}s"
        except Exception as e:  # noqa: BLE001 - a probe that fails in any way is a failed probe
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            self.caught("probe", e, f"the {name} probe of {self.key}")
        return ProbeResult(name, not reason, time.perf_counter() - t, reason)

    async def _http(self, session, url: str) -> str:
        async with session.get(url + "/health") as r:
            if r.status != 200:
                return f"GET /health answered {r.status}"
            models = (await r.json()).get("models", [])
        return "" if self.id in models else f"GET /health does not list '{self.id}'"

    async def _grpc(self, target: str, app: str) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=self.id), metadata=(("application", app),))
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return "" if status == "SERVING" else f"gRPC health is {status}"

    @staticmethod
    def _serve_status(app: str, deployment: str) -> str:
        from ray import serve

        application = serve.status().applications.get(app)
        if application is None:
            return f"Serve has no application '{app}'"
        dep = application.deployments.get(deployment)
        if dep is None:
            return f"application '{app}' has no deployment '{deployment}'"
        return "" if dep.status == "HEALTHY" else f"Serve reports {dep.status}: {dep.message[:120]}"

    async def _semantic(self, session, url: str, ref: dict[str, Any]) -> str:
        async with session.post(url + ref["path"], json=ref["request"], headers=self.headers) as r:
            if r.status != 200:
                return f"POST {ref['path']} answered {r.status}: {(await r.text())[:120]}"
            answer = await r.json()
        return semantic_check(ref["task"], ref["expected"], answer, self.s["min_cosine"])

    def _performance(self) -> ProbeResult:
        slo = self.s["slo"]
        latencies = sorted(t for t, _ in self.window)
        p50, p99 = (latencies[min(len(latencies) - 1, int(q * len(latencies)))] for q in (0.5, 0.99))
        errors = sum(not ok for _, ok in self.window) / len(self.window)
        broken = [f"p50 {1e3 * p50:.0f} ms > {slo['p50_ms']} ms" if 1e3 * p50 > slo["p50_ms"] else "",
                  f"p99 {1e3 * p99:.0f} ms > {slo['p99_ms']} ms" if 1e3 * p99 > slo["p99_ms"] else "",
                  f"error rate {errors:.0%} > {slo['error_rate']:.0%}" if errors > slo["error_rate"] else ""]
        return ProbeResult("performance", not any(broken), 0.0, ", ".join(b for b in broken if b))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Monitor:
    """Started by jobs.monitor as a detached, named actor; `status()` is what jobs.status prints."""

    def __init__(self, settings: dict[str, Any]):
        self.s = settings
        self.store = Storage(settings["storage"])
        saved = self.store.read_json(state_path(settings["app"])) or {}
        self.health = {d: Health.from_dict(h) for d, h in saved.get("health", {}).items()}
        self.alerts = Alerts(settings["webhook"]["cooldown_s"], saved.get("alerts"))
        self.starts = saved.get("starts", 0) + 1
        self.webhook_failures = saved.get("webhook_failures", 0)
        self.errors: Counter[str] = Counter()  # exceptions caught and carried on from, by where
        self.lock, self.errors_lock = threading.Lock(), threading.Lock()
        self._metrics()
        threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True, name="helio-monitor").start()

    def _metrics(self) -> None:
        from ray.util import metrics

        # On Ray's Prometheus endpoint as ray_helio_probes_total, ray_helio_probe_latency_seconds_bucket,
        # ray_helio_model_state, ray_helio_incidents_total (cluster/grafana/helio_monitor.json plots them).
        keys = ("app", "model", "probe")
        self.m_probes = metrics.Counter("helio_probes", "Health probes run, by result.", keys + ("result",))
        self.m_latency = metrics.Histogram("helio_probe_latency_seconds", "Health probe latency.",
                                           [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], keys)
        self.m_state = metrics.Gauge("helio_model_state", "0 healthy, 1 degraded, 2 unhealthy.", ("app", "model"))
        self.m_incidents = metrics.Counter("helio_incidents", "Incidents opened.", ("app", "model"))
        self.m_errors = metrics.Counter("helio_monitor_errors", "Exceptions the monitor caught and carried on "
                                        "from (a probe that raised, an unreadable file, a failing webhook).",
                                        ("app", "where"))

    def _caught(self, where: str, e: BaseException, detail: str = "") -> None:
        """Every exception the monitor carries on from: logged, and counted by `where` (status()'s
        `errors`, helio_monitor_errors). Its own lock: status() holds the main one reading the routing."""
        with self.errors_lock:
            self.errors[where] += 1
        self.m_errors.inc(1, {"app": self.s["app"], "where": where})
        log.warning("monitor %s: %s failed: %s: %s", self.s["app"], detail or where, type(e).__name__, e)

    # ---- what callers ask ----

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"app": self.s["app"], "starts": self.starts, "pid": os.getpid(),
                    "webhook_failures": self.webhook_failures, "routing": self._routing(),
                    "errors": dict(self.errors), "models": {d: h.to_dict() for d, h in self.health.items()}}

    # ---- the probing loop (its own thread and event loop) ----

    async def _main(self) -> None:
        import aiohttp

        keys = [k for k in os.environ.get("HELIO_API_KEYS", "").split(",") if k] + list(self.s["api_keys"])
        headers = {"authorization": f"Bearer {keys[0]}"} if keys else {}
        running: dict[str, asyncio.Task] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.s["timeout_s"])) as session:
            while True:
                versions = [(m, "stable") for m in (self._references() or {}).get("models", {})]
                versions += [(m, "canary") for m, r in self._routing().items() if r["status"] in ("canary", "promoted")]
                for model_id, version in versions:
                    probes = Probes(model_id, version, self.s, headers, self._caught)
                    if probes.key not in running or running[probes.key].done():
                        running[probes.key] = asyncio.create_task(self._watch(session, probes))
                await asyncio.sleep(self.s["period_s"])

    def _routing(self) -> dict[str, dict]:
        try:
            return (self.store.read_json(routing_path(self.s["app"])) or {}).get("models", {})
        except Exception as e:  # noqa: BLE001 - reported and retried, not fatal
            self._caught("routing read", e)
            return {}

    def _references(self) -> dict | None:
        try:
            return self.store.read_json(references_path(self.s["app"]))
        except Exception as e:  # noqa: BLE001 - a bad file is reported and retried, not fatal
            self._caught("references read", e)
            return None

    async def _watch(self, session, probes: Probes) -> None:
        """One model's schedule: a round of probes every period, whatever the other models do."""
        rollout = None  # a canary's health is its own rollout's: a new rollout starts it afresh
        while True:
            start = time.monotonic()
            refs = self._references()
            ref = (refs or {}).get("models", {}).get(probes.id)
            route = self._routing().get(probes.id) if probes.version == "canary" else None
            if ref is None or (probes.version == "canary" and (route is None or route["status"] == "rolled_back")):
                return  # the model (or its canary) is no longer part of the application
            if route is not None and route["since"] != rollout and route["status"] == "canary":
                rollout, probes.window = route["since"], []
                with self.lock:
                    self.health[probes.key] = Health(probes.key)
            results = await probes.run(session, ref, refs)
            alert = self._record(probes.key, results)
            if alert is not None:
                await self._alert(session, alert)
            if route is not None and route["status"] == "canary":
                await self._judge_canary(session, probes, route)
            await asyncio.sleep(max(0.0, self.s["period_s"] - (time.monotonic() - start)))

    async def _judge_canary(self, session, probes: Probes, route: dict) -> None:
        """Rolls a canary back as soon as it is unhealthy; promotes it after `promote_after` good rounds."""
        with self.lock:
            health = self.health[probes.key]
            if health.state == "unhealthy":
                status, reason = "rolled_back", f"canary {route['canary']} unhealthy: {health.incidents[-1]['reason']}"
                health.incidents[-1]["action"] = f"rolled back to {route['stable']}"
            elif health.state == "healthy" and health.streak_verdict == "ok" and \
                    health.streak >= route["promote_after"]:
                status, reason = "promoted", f"canary {route['canary']} healthy for {health.streak} rounds"
            else:
                return
            self._save()
        set_rollout(self.store, self.s["app"], probes.id, status, reason)
        await self._alert(session, {"deployment": probes.key, "from": "canary", "to": status, "time": time.time(),
                                    "reason": reason, "incident": health.incidents[-1] if health.incidents else None})

    def _record(self, model_id: str, results: list[ProbeResult]) -> dict | None:
        tags = {"app": self.s["app"], "model": model_id}
        for r in results:
            self.m_probes.inc(1, {**tags, "probe": r.probe, "result": "pass" if r.ok else "fail"})
            self.m_latency.observe(r.latency_s, {**tags, "probe": r.probe})
        with self.lock:
            health = self.health.setdefault(model_id, Health(model_id))
            alert = health.record(results, self.s["fail_after"], self.s["recover_after"], self.s["history"])
            admitted = alert is not None and self.alerts.admit(alert)
            self._save()
        self.m_state.set(STATES.index(health.state), tags)
        if alert is not None and alert["from"] == "healthy":
            self.m_incidents.inc(1, tags)
        return alert if admitted else None

    def _save(self) -> None:
        self.store.write_json(state_path(self.s["app"]), {
            "health": {d: h.to_dict() for d, h in self.health.items()}, "alerts": self.alerts.sent,
            "starts": self.starts, "webhook_failures": self.webhook_failures})

    async def _alert(self, session, alert: dict) -> None:
        line = json.dumps({"event": "helio_alert", "app": self.s["app"], **alert})
        (log.error if alert["to"] == "unhealthy" else log.warning)(line)
        print(line, flush=True)  # the actor's stdout is in Ray's logs (and the driver's, when it listens)
        url = self.s["webhook"]["url"]
        if not url:
            return
        try:
            async with session.post(url, json={"app": self.s["app"], **alert}) as r:
                if r.status >= 300:
                    raise RuntimeError(f"answered {r.status}")
        except Exception as e:  # noqa: BLE001 - a failing webhook never stops the monitor
            with self.lock:
                self.webhook_failures += 1
            self._caught("webhook", e, f"the webhook {url}")


# ---- the driver's side: start the actor, wait for its rounds, print what it knows ----

def start_monitor(cfg: MonitorConfig):
    """The app's monitor actor: the running one, or a new detached one (also after `restart`)."""
    if cfg.restart:
        try:
            ray.kill(ray.get_actor(actor_name(cfg.app), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # none running
        # The killed actor keeps its name for a moment; `get_if_exists` would hand back the dead one.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ray.get_actor(actor_name(cfg.app), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the killed monitor of '{cfg.app}' still holds its name after 60 s")
    return Monitor.options(name=actor_name(cfg.app), namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True).remote(to_dict(cfg))


def wait_for_round(actor, models: list[str], after: float, timeout_s: float) -> dict:
    """Polls the monitor until every model has a round newer than `after` (not just history it
    reloaded); its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(actor.status.remote(), timeout=60)
        fresh = [m for m in models if any(r["time"] > after for r in status["models"].get(m, {}).get("rounds", []))]
        if len(fresh) == len(models) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def format_status(status: dict) -> str:
    rows = [(f"{model} rollout", f"{r['status']}: {r['stable']} {1 - r['share']:.0%} / {r['canary']} (canary) "
                                 f"{r['share']:.0%}" + (f"; {r['reason'][:70]}" if r["reason"] else ""))
            for model, r in sorted(status.get("routing", {}).items())]
    for model, h in sorted(status["models"].items()):
        last = h["rounds"][-1] if h["rounds"] else {"verdict": "-", "reason": "", "probes": []}
        probes = " ".join(f"{p['probe']}={'ok' if p['ok'] else 'FAIL'}({1e3 * p['latency_s']:.0f}ms)"
                          for p in last["probes"] if p["probe"] != "performance")
        incident = h["incidents"][-1] if h["incidents"] else None
        inc = (f"{incident['id']} {'closed' if incident['closed'] else 'OPEN'}: {incident['reason'][:60]}"
               if incident else "none")
        rows.append((model, f"{h['state']:<9} last: {last['verdict']:<7} {probes}"))
        rows.append(("", f"incidents: {len(h['incidents'])}, latest {inc}"))
    if status.get("errors"):
        rows.append(("errors caught", ", ".join(f"{where} {n}" for where, n in sorted(status["errors"].items()))))
    return format_summary(f"monitor of '{status['app']}' (start #{status['starts']}, "
                          f"webhook failures {status['webhook_failures']})", rows)


def read_references(cfg: MonitorConfig) -> dict[str, Any]:
    """What jobs.serve recorded for the app at deployment: the monitor's semantic probes need it."""
    refs = Storage(cfg.storage).read_json(references_path(cfg.app))
    if refs is None:
        raise UserError(f"no references for application '{cfg.app}' under {cfg.storage}: deploy it with "
                        "jobs.serve first (it records what each model answers)")
    return refs


def first_round(cfg: MonitorConfig, refs: dict[str, Any]) -> tuple[Any, dict]:
    """Starts (or finds) the app's monitor and waits for a round of every model it references:
    (the actor, its status)."""
    started = time.time()
    actor = start_monitor(cfg)
    status = wait_for_round(actor, sorted(refs["models"]), started, timeout_s=2 * cfg.period_s + 6 * cfg.timeout_s)
    return actor, status
