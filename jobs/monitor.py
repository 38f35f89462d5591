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

import sys
import time

# The config and the driver's side of the monitor live with its actor (jobs.serve and jobs.status use
# them too); `start` is the name callers of this job know.
from actors.monitor import (MonitorConfig, Slo, Webhook, first_round, format_status, read_references,
                            start_monitor as start, wait_for_round)
from cluster.cli import run_job
from cluster.runtime import connect_job, embedded

__all__ = ["MonitorConfig", "Slo", "Webhook", "first_round", "format_status", "main", "run", "start",
           "wait_for_round"]


def run(cfg: MonitorConfig) -> dict:
    import ray

    refs = read_references(cfg)
    connect_job(cfg)
    actor, status = first_round(cfg, refs)
    print(format_status(status), flush=True)
    if not embedded(cfg) or cfg.monitor_seconds == 0:
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
