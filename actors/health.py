"""Health of one deployment from its probe results: states with hysteresis, incidents, alerts.

Each round of probes gives a verdict: `ok` (every probe passed), `slow` (only the performance SLOs
failed) or `failing` (liveness or semantic probes failed). The state moves only after enough
consecutive rounds agree (`fail_after` toward worse, `recover_after` toward healthy), so one lost
packet is not an incident and one good answer is not a recovery:

    healthy   <-(recover_after ok)-  degraded / unhealthy
    healthy   -(fail_after slow)->   degraded
    any       -(fail_after failing)-> unhealthy

Leaving healthy opens an incident (an id, the reason, when); returning to healthy closes it. Every
state change is an alert. Everything here is plain data, so the monitor persists it and a restarted
monitor continues where it was.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

STATES = ("healthy", "degraded", "unhealthy")
TARGET = {"ok": "healthy", "slow": "degraded", "failing": "unhealthy"}


@dataclass
class ProbeResult:
    probe: str  # http, grpc, serve_status, semantic, performance
    ok: bool
    latency_s: float
    reason: str = ""  # why it failed (empty when it passed)


def verdict(results: list[ProbeResult]) -> tuple[str, str]:
    """(ok | slow | failing, the reasons of the failed probes)."""
    failed = [r for r in results if not r.ok]
    reason = "; ".join(f"{r.probe}: {r.reason}" for r in failed)
    if any(r.probe != "performance" for r in failed):
        return "failing", reason
    return ("slow", reason) if failed else ("ok", "")


@dataclass
class Health:
    """One deployment's state, its recent rounds and incidents (bounded), and the run of agreeing verdicts."""
    deployment: str
    state: str = "healthy"
    streak_verdict: str = "ok"
    streak: int = 0
    rounds: list[dict] = field(default_factory=list)  # newest last: time, verdict, reason, probes
    incidents: list[dict] = field(default_factory=list)  # newest last: id, opened, closed, reason, worst
    next_incident: int = 1

    def record(self, results: list[ProbeResult], fail_after: int, recover_after: int, keep: int,
               now: float | None = None) -> dict | None:
        """Adds one round; returns the alert when the state changed (else None)."""
        now = time.time() if now is None else now
        v, reason = verdict(results)
        self.rounds.append({"time": now, "verdict": v, "reason": reason, "probes": [asdict(r) for r in results]})
        del self.rounds[:-keep]
        self.streak = self.streak + 1 if v == self.streak_verdict else 1
        self.streak_verdict = v
        target = TARGET[v]
        needed = recover_after if target == "healthy" else fail_after
        if target == self.state or self.streak < needed:
            return None
        if target == "degraded" and self.state == "unhealthy":
            return None  # from unhealthy only a recovery (or staying) moves the state
        before, self.state = self.state, target
        incident = self._incident(before, target, reason, now)
        return {"deployment": self.deployment, "from": before, "to": target, "time": now,
                "reason": reason or "every probe passed", "incident": incident}

    def _incident(self, before: str, after: str, reason: str, now: float) -> dict:
        if before == "healthy":  # open
            self.incidents.append({"id": f"{self.deployment}-{self.next_incident}", "opened": now, "closed": None,
                                   "reason": reason, "worst": after})
            self.next_incident += 1
            del self.incidents[:-50]
        current = self.incidents[-1]
        if after == "healthy":
            current["closed"] = now
        elif STATES.index(after) > STATES.index(current["worst"]):
            current["worst"] = after
        return dict(current)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Health:
        return cls(**data)


class Alerts:
    """Which alerts go out: at most one per (deployment, incident, new state), and at most one per
    deployment per `cooldown_s` unless it closes an incident (a recovery is always told)."""

    def __init__(self, cooldown_s: float, sent: dict[str, Any] | None = None):
        self.cooldown_s = cooldown_s
        self.sent = sent or {"keys": [], "last": {}}

    def admit(self, alert: dict) -> bool:
        key = f"{alert['deployment']}|{alert['incident']['id']}|{alert['to']}"
        last = self.sent["last"].get(alert["deployment"])
        if key in self.sent["keys"]:
            return False
        if alert["to"] != "healthy" and last is not None and alert["time"] - last < self.cooldown_s:
            return False
        self.sent["keys"] = (self.sent["keys"] + [key])[-500:]
        self.sent["last"][alert["deployment"]] = alert["time"]
        return True
