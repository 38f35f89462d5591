"""Promote or roll back a model's canary by hand (the monitor does either on its own).

    python -m jobs.rollout --set app=serve_demo --set model=demo-llama --set action=rollback
    python -m jobs.rollout --set app=serve_demo --set model=demo-llama --set action=promote

A canary starts with jobs.serve: give a model entry `canary: {artifact: NEW, share: 0.1}` and deploy
the config again. Promote sends all of the model's traffic to the canary; rollback sends none. The
ingress picks the change up within a second (it reads `{storage}/serving/{app}/routing.json`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from cluster.cli import UserError, format_summary, run_job


@dataclass(frozen=True)
class RolloutConfig:
    name: str = "rollout"
    storage: str = "./runs"
    app: str = "serve_demo"
    model: str = ""
    action: str = "rollback"  # promote | rollback
    reason: str = "by hand (jobs.rollout)"

    def __post_init__(self) -> None:
        if self.action not in ("promote", "rollback"):
            raise ValueError(f"action: must be promote or rollback, not {self.action!r}")
        if not self.model:
            raise ValueError("model: name the model whose canary to promote or roll back")


def run(cfg: RolloutConfig) -> dict:
    from actors.monitor import set_rollout
    from cluster.storage import Storage

    try:
        route = set_rollout(Storage(cfg.storage), cfg.app, cfg.model,
                            "promoted" if cfg.action == "promote" else "rolled_back", cfg.reason)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(format_summary(f"{cfg.app}: {cfg.model} {route['status']}", [
        ("stable", f"{route['stable']} {1 - route['share']:.0%}"), ("canary", f"{route['canary']} {route['share']:.0%}"),
        ("reason", route["reason"])]))
    return route


CONFIG_CLASS = RolloutConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.rollout", __doc__, RolloutConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
