"""``rackpower mqtt acl``: the generated Mosquitto files grant each identity its topics only.

The grants are checked on the rendered ACL text (parsed back here), not on the plan the
text came from, against a table of who must be able to publish and read every topic of
the site; the matcher is checked against paho's MQTT matcher. That the broker enforces
the file as read here is shown with a real Mosquitto in tests/integration/test_mqtt_acl.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml

from controller.cli.main import main
from controller.integrations.broker_acl import (
    Rule,
    allowed,
    plan_for_site,
    render_acl,
    usernames_in_template,
)
from controller.model.loader import parse_site
from tests.sites import agent_site

CTL = "rackpower-tiny"
AGENTS = ["agent-rack-1-n1", "agent-rack-1-n2", "agent-rack-2-n1", "agent-rack-2-n2"]
BASE = "rackpower/tiny"


def site_dict(**mqtt: Any) -> dict[str, Any]:
    return agent_site({"url": "mqtts://broker.example:8883", **mqtt})


def parse_acl(text: str) -> tuple[list[str], dict[str, list[Rule]]]:
    """Mosquitto's reading: (lines before any `user` line, rules per user)."""
    before: list[str] = []
    users: dict[str, list[Rule]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            current = rest.strip()
            assert current not in users, f"user {current} twice"
            users[current] = []
        elif current is None:
            before.append(line)
        else:
            assert word == "topic", f"unexpected line {line!r}"
            access, _, topic = rest.partition(" ")
            assert access in ("read", "write"), line
            users[current].append(Rule(access, topic))  # type: ignore[arg-type]
    return before, users


def topics_of_site() -> list[str]:
    out = [f"{BASE}/status", f"{BASE}/cmd", f"{BASE}/cmd/ack"]
    out += [f"{BASE}/telemetry/rack-1", f"{BASE}/alarms/envelope_exceeded:rack-1"]
    for a in AGENTS:
        out += [f"{BASE}/agent/{a}/{leaf}" for leaf in ("lease", "telemetry", "status")]
    out += ["rackpower/other/cmd", "rackpower/other/agent/agent-rack-1-n1/lease", "$SYS/broker"]
    return out


def expected(user: str, access: str, topic: str) -> bool:
    """Who may do what, written out from docs/mqtt.md and docs/agent-link.md."""
    if not topic.startswith(BASE + "/"):
        return False  # other sites, $SYS: nobody
    rest = topic[len(BASE) + 1 :]
    if rest.startswith("agent/"):
        _, agent, leaf = rest.split("/")
        if user == CTL:
            return (access, leaf) in {("write", "lease"), ("read", "telemetry"), ("read", "status")}
        if user == agent:
            return (access, leaf) in {
                ("read", "lease"),
                ("write", "telemetry"),
                ("write", "status"),
            }
        return False
    kind = rest.split("/")[0] if rest != "cmd/ack" else "ack"
    if user == CTL:
        return (access, kind) in {
            ("write", "status"), ("write", "telemetry"), ("write", "alarms"),
            ("write", "ack"), ("read", "cmd"),
        }  # fmt: skip
    if user == "bms":
        return (access, kind) in {
            ("write", "cmd"), ("read", "ack"), ("read", "status"),
            ("read", "telemetry"), ("read", "alarms"),
        }  # fmt: skip
    return False  # agents: nothing of the BMS tree


def test_each_identity_may_publish_and_read_exactly_its_topics() -> None:
    plan = plan_for_site(parse_site(site_dict()))
    _, users = parse_acl(render_acl(plan))
    assert sorted(users) == sorted([CTL, "bms", *AGENTS])
    wrong = [
        (user, access, topic)
        for user, rules in users.items()
        for topic in topics_of_site()
        for access in ("read", "write")
        if allowed(rules, access, topic) != expected(user, access, topic)
    ]
    assert wrong == []
    # And the controller's subscriptions themselves are covered by its read grants.
    for sub in (f"{BASE}/agent/+/telemetry", f"{BASE}/agent/+/status", f"{BASE}/cmd"):
        assert allowed(users[CTL], "read", sub)


def test_anonymous_clients_are_granted_nothing() -> None:
    text = render_acl(plan_for_site(parse_site(site_dict())))
    before, _ = parse_acl(text)
    assert before == []  # topic lines before any `user` line would be anonymous grants
    assert not any(line.strip().startswith("pattern") for line in text.splitlines())


@pytest.mark.parametrize(
    ("pattern", "topic"),
    [
        ("a/+/lease", "a/x/lease"),
        ("a/+/lease", "a/x/y/lease"),
        ("a/+/lease", "a/lease"),
        ("a/#", "a"),
        ("a/#", "a/b/c"),
        ("a/#", "ab/c"),
        ("a/b", "a/b/c"),
        ("a/b/c", "a/b"),
        ("a/+", "a/+"),
    ],
)
def test_the_matcher_matches_as_mqtt_does(pattern: str, topic: str) -> None:
    assert allowed([Rule("read", pattern)], "read", topic) == paho.topic_matches_sub(pattern, topic)


@pytest.mark.parametrize(
    ("argv", "site_user", "want"),
    [
        ([], None, "rackpower-tiny"),  # the default controller id
        ([], "ctl-main", "ctl-main"),  # what the controller connects as
        (["--controller-user", "ctl-b"], "ctl-main", "ctl-b"),
    ],
)
def test_controller_username(
    tmp_path: Path, argv: list[str], site_user: str | None, want: str
) -> None:
    cfg = tmp_path / "site.yaml"
    extra = {"username": site_user} if site_user else {}
    cfg.write_text(yaml.safe_dump(site_dict(**extra)))
    out = tmp_path / "out"
    assert main(["mqtt", "acl", "--config", str(cfg), "--out-dir", str(out), *argv]) == 0
    _, users = parse_acl((out / "rackpower-tiny.acl").read_text())
    assert Rule("write", f"{BASE}/agent/+/lease") in users[want]
    assert want in usernames_in_template((out / "rackpower-tiny.passwd.template").read_text())


def test_writes_the_three_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(site_dict(username=CTL)))
    out = tmp_path / "out"
    argv = ["mqtt", "acl", "--config", str(cfg), "--out-dir", str(out), "--port", "18883"]
    assert main([*argv, "--install-dir", "/srv/mq"]) == 0
    conf = (out / "rackpower-tiny.conf").read_text().splitlines()
    for line in (
        "allow_anonymous false",
        "acl_file /srv/mq/rackpower-tiny.acl",
        "password_file /srv/mq/rackpower-tiny.passwd",
        "listener 18883",
        "certfile /srv/mq/certs/server.crt",
        "keyfile /srv/mq/certs/server.key",
    ):
        assert line in conf
    template = (out / "rackpower-tiny.passwd.template").read_text()
    assert usernames_in_template(template) == [CTL, "bms", *AGENTS]
    # Bare names, no `name:hash`: loaded by mistake it lets nobody in (no empty passwords).
    assert all(":" not in u for u in usernames_in_template(template))
    assert "mosquitto_passwd" in template
    captured = capsys.readouterr()
    assert "6 broker identities" in captured.out
    assert captured.err == ""  # username and mqtts:// set: nothing to warn about


def test_warns_about_what_the_broker_will_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(agent_site({"url": "mqtt://127.0.0.1:1883"})))
    assert main(["mqtt", "acl", "--config", str(cfg), "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "username is not set" in err and "is not mqtts://" in err


def _with_prefix(d: dict[str, Any]) -> None:
    d["integrations"]["mqtt"]["topic_prefix"] = "rack#power"


BAD: list[tuple[str, Any, list[str], str]] = [
    ("wildcard prefix", _with_prefix, [], "integrations.mqtt.topic_prefix: 'rack#power'"),
    (
        "bms user is an agent",
        None,
        ["--bms-user", "agent-rack-1-n2"],
        "username 'agent-rack-1-n2' is both the BMS and agent agent-rack-1-n2",
    ),
    (
        "controller user is the bms",
        None,
        ["--controller-user", "bms"],
        "username 'bms' is both the controller and the BMS",
    ),
    ("controller user with a colon", None, ["--controller-user", "ctl:1"], "'ctl:1' cannot be"),
    ("bms user with a blank", None, ["--bms-user", "b m s"], "'b m s' cannot be a broker"),
]


@pytest.mark.parametrize(("name", "mutate", "argv", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_naming_file_path_and_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    mutate: Any,
    argv: list[str],
    reason: str,
) -> None:
    d = site_dict()
    if mutate is not None:
        mutate(d)
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    assert main(["mqtt", "acl", "--config", str(cfg), "--out-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{cfg}: 1 problem:"), err
    assert reason in err
    assert not out.exists()  # nothing half-written


def test_agent_id_that_cannot_be_a_username_names_its_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = site_dict()
    d["devices"].append({"id": "agent:spare", "driver": "agent"})
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["mqtt", "acl", "--config", str(cfg), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: devices[" in err and "agent id 'agent:spare' cannot be a broker" in err


def test_an_invalid_site_exits_2_with_the_usual_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = site_dict()
    d["feeds"][0]["envelope_w"] = -1
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["mqtt", "acl", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith(f"{cfg}: ")
    assert main(["mqtt", "acl", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_help_explains_the_identities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mqtt", "acl", "--help"]) == 0
    out = capsys.readouterr().out
    for phrase in ("allow_anonymous false", "its own", "mosquitto_passwd", "--out-dir", "Exits 2"):
        assert phrase in out
