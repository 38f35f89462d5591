"""Watch a Serve application that jobs.serve deployed: probes, health states, metrics, alerts.

    python -m jobs.monitor jobs/configs/monitor_demo.yaml [--set webhook.url=http://... ...]
    python -m jobs.status jobs/configs/monitor_demo.yaml      # the table of what the monitor knows

Starts (or finds: one per application) the detached monitor actor (actors/monitor.py), which probes
every model of `app` each `period_s` against the references jobs.serve recorded at deployment, keeps
each model's state (healthy / degraded / unhealthy, `fail_after` / `recover_after` rounds to
change), writes it to `{storage}/monitor/{app}/state.json`, exports `helio_probe_*`,
`helio_model_state` and `helio_incidents_total` to Ray's metrics, and alerts on every state
change (a JSON log line; `webhook.url` gets it POSTed). Against a running cluster the job starts
the actor and returns; on the embedded default it prints state changes until interrupted.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from cluster.cli import UserError, format_summary, run_job

log = logging.getLogger("helio")


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
class MonitorConfig:
    name: str = "monitor_demo"
    storage: str = "./runs"
    app: str = "serve_demo"  # the Serve application jobs.serve deployed (its config's `name`)
    ray_address: str | None = None
    local_cpus: int | None = None
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


def start(cfg: MonitorConfig):
    """The app's monitor actor: the running one, or a new detached one (also after `restart`)."""
    import ray

    from actors.monitor import NAMESPACE, Monitor, actor_name
    from cluster.config import to_dict

    if cfg.restart:
        try:
            ray.kill(ray.get_actor(actor_name(cfg.app), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # none running
    return Monitor.options(name=actor_name(cfg.app), namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True).remote(to_dict(cfg))


def wait_for_round(actor, models: list[str], after: float, timeout_s: float) -> dict:
    """Polls the monitor until every model has a round newer than `after` (not just history it
    reloaded); its status."""
    import ray

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
    return format_summary(f"monitor of '{status['app']}' (start #{status['starts']}, "
                          f"webhook failures {status['webhook_failures']})", rows)


def run(cfg: MonitorConfig) -> dict:
    import os

    import ray

    from actors.monitor import references_path
    from cluster.runtime import connect
    from cluster.storage import Storage

    refs = Storage(cfg.storage).read_json(references_path(cfg.app))
    if refs is None:
        raise UserError(f"no references for application '{cfg.app}' under {cfg.storage}: deploy it with "
                        "jobs.serve first (it records what each model answers)")
    log.info(connect(cfg.ray_address, cfg.local_cpus))
    started = time.time()
    actor = start(cfg)
    status = wait_for_round(actor, sorted(refs["models"]), started, timeout_s=2 * cfg.period_s + 6 * cfg.timeout_s)
    print(format_status(status), flush=True)
    if cfg.ray_address or os.environ.get("RAY_ADDRESS") or cfg.monitor_seconds == 0:
        return status
    print("watching until interrupted (Ctrl-C); alerts are JSON lines in the monitor's log", flush=True)
    end = time.monotonic() + (cfg.monitor_seconds if cfg.monitor_seconds is not None else float("inf"))
    states = {m: h["state"] for m, h in status["models"].items()}
    while time.monotonic() < end:
        time.sleep(min(cfg.period_s, max(0.0, end - time.monotonic())))
        status = ray.get(actor.status.remote(), timeout=60)
        now = {m: h["state"] for m, h in status["models"].items()}
        if now != states:
            print(format_status(status), flush=True)
            states = now
    return status


CONFIG_CLASS = MonitorConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.monitor", __doc__, MonitorConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
