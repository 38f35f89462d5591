"""What the monitor of a Serve application knows: per model its state, last probes, incidents.

    python -m jobs.status jobs/configs/monitor_demo.yaml

Asks the running monitor actor (jobs.monitor); when none runs, reads the state it last wrote to
`{storage}/monitor/{app}/state.json`.
"""

from __future__ import annotations

import sys

from actors.monitor import NAMESPACE, MonitorConfig, actor_name, format_status, routing_path, state_path
from cluster.cli import UserError, run_job
from cluster.runtime import connect_job, embedded
from cluster.storage import Storage


def run(cfg: MonitorConfig) -> dict:
    status = None
    if not embedded(cfg):
        import ray

        connect_job(cfg)
        try:
            status = ray.get(ray.get_actor(actor_name(cfg.app), namespace=NAMESPACE).status.remote(), timeout=60)
        except ValueError:
            pass  # no monitor running: what it last wrote
    if status is None:
        saved = Storage(cfg.storage).read_json(state_path(cfg.app))
        if saved is None:
            raise UserError(f"no monitor has watched application '{cfg.app}' under {cfg.storage}")
        status = {"app": cfg.app, "starts": saved["starts"], "webhook_failures": saved["webhook_failures"],
                  "models": saved["health"],
                  "routing": (Storage(cfg.storage).read_json(routing_path(cfg.app)) or {}).get("models", {})}
    print(format_status(status))
    return status


CONFIG_CLASS = MonitorConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.status", __doc__, MonitorConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
