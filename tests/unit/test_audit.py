"""The audit trail: ring buffer, JSON-lines file read back, one log line per event, and a
broken file that never stops the caller."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from controller.core.audit import AuditLog, action_kind
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy.types import Migrate, Requeue, SetCap
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0


@pytest.fixture(scope="module")
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


def test_events_are_numbered_and_kept_newest_last() -> None:
    log = AuditLog(capacity=3)
    for k in range(5):
        log.record("command", f"c{k}", now_s=NOW_S + k)
    assert log.last_seq == 5
    kept = log.recent(limit=10)
    assert [(e.seq, e.reason, e.ts_s) for e in kept] == [
        (3, "c2", NOW_S + 2),
        (4, "c3", NOW_S + 3),
        (5, "c4", NOW_S + 4),
    ]


def test_recent_filters_by_seq_kind_and_limit() -> None:
    log = AuditLog()
    for k, kind in enumerate(["cap", "uncap", "cap", "refusal", "cap"]):
        log.record(kind, f"e{k}", now_s=NOW_S)
    assert [e.seq for e in log.recent(since_seq=2)] == [3, 4, 5]
    assert [e.seq for e in log.recent(kinds=["cap"])] == [1, 3, 5]
    assert [e.seq for e in log.recent(kinds=["cap", "refusal"], limit=2)] == [4, 5]
    assert log.recent(limit=0) == []


def test_json_lines_file_holds_every_event_with_its_readings(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path=path, capacity=1)
    log.record(
        "cap",
        "rack-1 above 97 % of its envelope",
        now_s=NOW_S,
        node="rack-1",
        job_id="train-7",
        readings={"rack-1.power_w": 6900.0, "rack-1.envelope_w": 7000.0, "pdu-1.power_w": math.nan},
        details={"limit_w": 350.0},
    )
    log.record("command", "demand response", now_s=NOW_S + 1, advisory=True)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2  # the file keeps what the ring buffer (capacity 1) dropped
    first = lines[0]
    assert first == {
        "seq": 1,
        "ts_s": NOW_S,
        "kind": "cap",
        "reason": "rack-1 above 97 % of its envelope",
        "node": "rack-1",
        "job_id": "train-7",
        "readings": {"rack-1.power_w": 6900.0, "rack-1.envelope_w": 7000.0, "pdu-1.power_w": None},
        "details": {"limit_w": 350.0},
        "advisory": False,
    }
    assert lines[1]["advisory"] is True


def test_file_is_appended_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(2):
        log = AuditLog(path=path)
        log.record("command", f"run {run}", now_s=NOW_S)
        log.close()
    assert [json.loads(x)["reason"] for x in path.read_text().splitlines()] == ["run 0", "run 1"]


def test_unwritable_file_is_counted_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(path=tmp_path)  # a directory: open() fails
    with caplog.at_level(logging.ERROR, logger="rackpower.audit"):
        for k in range(3):
            log.record("cap", f"c{k}", now_s=NOW_S)
    assert log.write_errors == 3
    assert [e.reason for e in log.recent()] == ["c0", "c1", "c2"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # said once, not once per event
    assert "cannot write" in errors[0].getMessage()


def test_one_log_line_per_event(caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog()
    with caplog.at_level(logging.INFO, logger="rackpower.audit"):
        log.record("cap", "row over", now_s=NOW_S, node="row", job_id="j1")
        log.record("refusal", "no headroom", now_s=NOW_S, advisory=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "rackpower.audit"]
    assert lines == [
        "cap node=row job=j1: row over",
        "[advisory] refusal node=- job=-: no headroom",
    ]


def test_policy_actions_are_classified_and_keep_their_reason(tree: PowerTree) -> None:
    gpus = tuple(range(4))  # rack-1-n1's GPUs, max 500 W
    cap = SetCap(job_id="j1", gpus=gpus, limit_w=350.0, reason="rack-1 over", node_id="rack-1")
    uncap = SetCap(job_id="j1", gpus=gpus, limit_w=500.0, reason="released", node_id="rack-1")
    mig = Migrate(job_id="j2", node_id="row", reason="caps at floor not enough")
    req = Requeue(job_id="j3", node_id="row", reason="nowhere to move")
    assert [action_kind(a, tree) for a in (cap, uncap, mig, req)] == [
        "cap",
        "uncap",
        "migrate",
        "requeue",
    ]
    log = AuditLog()
    event = log.record_action(cap, tree, now_s=NOW_S, readings={"rack-1.power_w": 7100.0})
    assert (event.kind, event.reason, event.node, event.job_id) == (
        "cap",
        "rack-1 over",
        "rack-1",
        "j1",
    )
    assert event.readings == {"rack-1.power_w": 7100.0}
    assert event.details == {"limit_w": 350.0, "gpus": 4, "servers": ["rack-1-n1"]}
    event = log.record_action(mig, tree, now_s=NOW_S, advisory=True)
    assert (event.kind, event.node, event.job_id, event.advisory) == ("migrate", "row", "j2", True)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        AuditLog(capacity=0)
