"""actors.health: hysteresis, incidents and alert admission, without Ray."""

from __future__ import annotations

from actors.health import Alerts, Health, ProbeResult

OK = [ProbeResult("http", True, 0.01), ProbeResult("semantic", True, 0.02), ProbeResult("performance", True, 0.0)]
DOWN = [ProbeResult("http", False, 0.01, "connection refused"), ProbeResult("semantic", True, 0.02)]
SLOW = [ProbeResult("http", True, 0.01), ProbeResult("performance", False, 0.0, "p99 900 ms > 500 ms")]


def feed(h: Health, rounds, fail_after=3, recover_after=2):
    return [h.record(r, fail_after, recover_after, keep=10, now=float(i)) for i, r in enumerate(rounds)]


def test_the_state_changes_only_after_enough_agreeing_rounds():
    h = Health("m")
    alerts = feed(h, [OK, DOWN, DOWN, OK, DOWN, DOWN, DOWN, DOWN, OK, DOWN, OK, OK])
    changes = [(i, a["from"], a["to"]) for i, a in enumerate(alerts) if a]
    assert changes == [(6, "healthy", "unhealthy"), (11, "unhealthy", "healthy")]
    assert h.state == "healthy" and len(h.rounds) == 10  # bounded history
    (incident,) = h.incidents
    assert incident["id"] == "m-1" and incident["opened"] == 6.0 and incident["closed"] == 11.0
    assert "http: connection refused" in incident["reason"] and incident["worst"] == "unhealthy"


def test_slow_rounds_degrade_and_failing_ones_escalate_the_same_incident():
    h = Health("m")
    alerts = [a for a in feed(h, [SLOW] * 3 + [DOWN] * 3 + [SLOW] * 3 + [OK] * 2) if a]
    assert [(a["from"], a["to"]) for a in alerts] == [("healthy", "degraded"), ("degraded", "unhealthy"),
                                                      ("unhealthy", "healthy")]
    assert len({a["incident"]["id"] for a in alerts}) == 1 and h.incidents[0]["worst"] == "unhealthy"
    feed(h, [DOWN] * 3)
    assert [i["id"] for i in h.incidents] == ["m-1", "m-2"] and h.incidents[1]["closed"] is None


def test_state_survives_a_round_trip_through_plain_data():
    h = Health("m")
    feed(h, [DOWN] * 3)
    again = Health.from_dict(h.to_dict())
    assert again == h
    assert feed(again, [OK, OK])[-1]["incident"]["id"] == "m-1"  # the restored one closes the open incident


def test_alerts_are_deduplicated_per_incident_and_rate_limited_except_recoveries():
    alerts = Alerts(cooldown_s=100)
    inc = {"id": "m-1"}
    down = {"deployment": "m", "to": "unhealthy", "time": 0.0, "incident": inc}
    assert alerts.admit(down) and not alerts.admit(down | {"time": 500.0})  # the same incident and state
    assert not alerts.admit({"deployment": "m", "to": "degraded", "time": 10.0, "incident": {"id": "m-2"}})
    assert alerts.admit({"deployment": "m", "to": "healthy", "time": 11.0, "incident": inc})  # recoveries pass
    assert alerts.admit({"deployment": "x", "to": "unhealthy", "time": 12.0, "incident": {"id": "x-1"}})
    assert Alerts(100, alerts.sent).admit(down) is False  # what was sent survives a restart
