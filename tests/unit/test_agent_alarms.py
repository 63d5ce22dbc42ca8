"""Agent alarms name the GPU server they are about, not only the agent id."""

from __future__ import annotations

from controller.core.alarms import AlarmKind, agent_alarms


def test_lost_and_failsafe_agents_name_their_server() -> None:
    alarms = agent_alarms(
        ["agent-n1"],
        {"agent-n1": "lease expired", "agent-n2": "no lease received"},
        100.0,
        {"agent-n1": "rack-1-n1", "agent-n2": "rack-1-n2"},
    )
    by_subject = {a.subject: a for a in alarms}
    assert set(by_subject) == {"agent-n1", "agent-n2"}  # a lost agent is not also at failsafe
    assert by_subject["agent-n1"].node == "rack-1-n1"
    assert by_subject["agent-n1"].severity == "critical"
    assert by_subject["agent-n2"].node == "rack-1-n2"
    assert by_subject["agent-n2"].severity == "warning"
    assert all(a.kind is AlarmKind.AGENT_LOST for a in alarms)
    assert by_subject["agent-n1"].to_json()["node"] == "rack-1-n1"


def test_an_agent_the_site_does_not_know_has_no_node() -> None:
    (alarm,) = agent_alarms(["stray"], {}, 1.0)
    assert alarm.node is None
