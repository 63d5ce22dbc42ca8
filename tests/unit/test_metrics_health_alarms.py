"""The series the alert rules need (configs/deploy/prometheus): health and active alarms.

Read back from the exposition text, as Prometheus would scrape it.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controller.core.alarms import Alarm, AlarmKind
from controller.core.metrics import Metrics
from controller.core.view import Health


def samples(m: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    text = m.render().decode()
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def test_health_is_a_state_set_with_the_counts_behind_it() -> None:
    m = Metrics("tiny")
    health = Health(
        status="degraded", mode="enforce", started_at_s=0.0, cycle_s=0.5,
        devices_total=4, devices_stale=1, agents_total=32, agents_lost=2, agents_failsafe=3,
    )  # fmt: skip
    m.refresh([], [], health=health, reservations=0)
    states = {labels["status"]: v for labels, v in samples(m, "rackpower_health_status")}
    assert states == {"starting": 0.0, "ok": 0.0, "degraded": 1.0, "stopping": 0.0}
    got = {
        name: samples(m, name)[0][1]
        for name in ("rackpower_devices_stale", "rackpower_agents_lost", "rackpower_agents")
    }
    assert got == {
        "rackpower_devices_stale": 1.0,
        "rackpower_agents_lost": 2.0,
        "rackpower_agents": 32.0,
    }
    assert samples(m, "rackpower_agents_failsafe")[0][1] == 3.0
    assert samples(m, "rackpower_cycle_period_seconds")[0][1] == 0.5
    assert samples(m, "rackpower_up")[0][1] == 0.0


def test_one_alarm_series_per_active_alarm_gone_when_cleared() -> None:
    m = Metrics("tiny")
    lost = Alarm(AlarmKind.AGENT_LOST, "agent-7", "lost", 1.0, severity="critical", node="srv-7")
    stale = Alarm(AlarmKind.DEVICE_STALE, "pdu-1", "stale", 1.0)
    m.set_alarms([lost, stale])
    got = sorted((lab["kind"], lab["subject"], lab["node"], lab["alarm_severity"], v)
                 for lab, v in samples(m, "rackpower_alarm"))  # fmt: skip
    assert got == [
        ("agent_lost", "agent-7", "srv-7", "critical", 1.0),
        ("device_stale", "pdu-1", "", "warning", 1.0),
    ]
    m.set_alarms([stale])
    assert [lab["kind"] for lab, _ in samples(m, "rackpower_alarm")] == ["device_stale"]
    m.set_alarms([])
    assert samples(m, "rackpower_alarm") == []
    assert "# TYPE rackpower_alarm gauge" in m.render().decode()  # the family stays known
