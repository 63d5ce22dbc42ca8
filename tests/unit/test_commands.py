"""BMS command validation as tables: what is accepted, what is refused and the reason given.

Pure: no broker, no clock (``NOW_S`` is passed in). The tiny site's racks are rated
8000 W with a 7000 W envelope and can be brought down to 1200 W (GPUs at floor plus
baselines).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from controller.core.setpoints import (
    DEFAULT_LIMITS,
    Ack,
    Command,
    CommandLimits,
    CommandProcessor,
    CommandRefused,
    DemandResponse,
    EnvelopeOverride,
    ModeSwitch,
    format_ts,
)
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0  # 2025-06-15T15:06:40Z


@pytest.fixture(scope="module")
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


def at(offset_s: float) -> str:
    return format_ts(NOW_S + offset_s)


def dr(**over: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "type": "demand_response",
        "command_id": "dr-1",
        "node": "rack-1",
        "limit_w": 5000,
        "expires_at": at(3600),
    }
    cmd.update(over)
    return {k: v for k, v in cmd.items() if v is not None}


def env(**over: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "type": "envelope_override",
        "command_id": "env-1",
        "node": "row",
        "envelope_w": 14000,
        "ttl_s": 600,
    }
    cmd.update(over)
    return {k: v for k, v in cmd.items() if v is not None}


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Command] = []

    def __call__(self, cmd: Command) -> None:
        self.applied.append(cmd)


def handle(
    tree: PowerTree, payload: dict[str, Any] | str | bytes, now_s: float = NOW_S
) -> tuple[Ack, list[Command]]:
    rec = Recorder()
    raw = json.dumps(payload) if isinstance(payload, dict) else payload
    ack, _ = CommandProcessor(tree).handle(raw, now_s, rec)
    return ack, rec.applied


# ---------------------------------------------------------------------------
# accepted


def test_demand_response_with_expires_at_is_accepted_as_sent(tree: PowerTree) -> None:
    ack, applied = handle(tree, dr())
    assert (ack.status, ack.command_id, ack.type, ack.reason) == (
        "accepted",
        "dr-1",
        "demand_response",
        None,
    )
    [cmd] = applied
    assert isinstance(cmd, DemandResponse)
    assert (cmd.node, cmd.limit_w) == ("rack-1", 5000.0)
    assert cmd.expires_at_s(NOW_S) == pytest.approx(NOW_S + 3600)
    assert ack.expires_at_s == pytest.approx(NOW_S + 3600)
    body = json.loads(ack.payload())
    assert body == {
        "command_id": "dr-1",
        "type": "demand_response",
        "status": "accepted",
        "reason": None,
        "duplicate": False,
        "expires_at": at(3600),
        "ts": at(0),
    }


def test_ttl_becomes_an_absolute_expiry_before_it_is_applied(tree: PowerTree) -> None:
    ack, [cmd] = handle(tree, env(ttl_s=600))
    assert ack.accepted
    assert isinstance(cmd, EnvelopeOverride)
    assert cmd.ttl_s is None
    assert cmd.expires_at == datetime.fromtimestamp(NOW_S + 600, UTC)
    # Later readers of the command see the same deadline, whatever "now" they pass.
    assert cmd.expires_at_s(NOW_S + 1000) == pytest.approx(NOW_S + 600)


def test_f8_envelope_override_may_not_raise_the_envelope(tree: PowerTree) -> None:
    """On c203a14 this was accepted, and the policy (taking the minimum) ignored it."""
    ack, applied = handle(tree, env(node="rack-2", envelope_w=7001))
    assert not ack.accepted and applied == []
    assert ack.reason is not None
    assert "above the configured envelope of rack-2 (7000 W)" in ack.reason
    ack, _ = handle(tree, env(node="rack-2", envelope_w=7000))
    assert ack.accepted, ack.reason


def test_limit_exactly_at_floor_is_accepted(tree: PowerTree) -> None:
    ack, _ = handle(tree, dr(limit_w=tree.floor_draw_w("rack-1")))
    assert ack.accepted, ack.reason


MODES_ON = CommandLimits(allow_mode_commands=True, max_advisory_s=3600)


def test_mode_switch_is_accepted_when_the_site_allows_it(tree: PowerTree) -> None:
    rec = Recorder()
    proc = CommandProcessor(tree, MODES_ON)
    ack, _ = proc.handle(
        json.dumps({"type": "mode", "command_id": "m", "mode": "enforce"}), NOW_S, rec
    )
    assert ack.accepted and ack.expires_at_s is None
    payload = {"type": "mode", "command_id": "a", "mode": "advisory", "ttl_s": 600}
    ack, _ = proc.handle(json.dumps(payload), NOW_S, rec)
    assert ack.accepted and ack.expires_at_s == pytest.approx(NOW_S + 600)
    [enforce, advisory] = rec.applied
    assert isinstance(enforce, ModeSwitch) and enforce.mode == "enforce"
    assert isinstance(advisory, ModeSwitch) and advisory.mode == "advisory"
    assert advisory.expires_at_s(NOW_S + 1000) == pytest.approx(NOW_S + 600)


MODE_REJECTIONS: list[tuple[str, CommandLimits, dict[str, Any], str]] = [
    ("off by default", DEFAULT_LIMITS,
     {"type": "mode", "command_id": "m", "mode": "advisory", "ttl_s": 60},
     "mode commands are disabled on this controller"),
    ("enforce off by default too", DEFAULT_LIMITS,
     {"type": "mode", "command_id": "m", "mode": "enforce"}, "allow_mode_commands"),
    ("advisory without expiry", MODES_ON,
     {"type": "mode", "command_id": "m", "mode": "advisory"}, "an expiry is required"),
    ("advisory too long", MODES_ON,
     {"type": "mode", "command_id": "m", "mode": "advisory", "ttl_s": 3601},
     "more than the maximum 3600 s"),
    ("advisory in the past", MODES_ON,
     {"type": "mode", "command_id": "m", "mode": "advisory", "expires_at": at(-5)},
     "is not in the future"),
    ("enforce with expiry", MODES_ON,
     {"type": "mode", "command_id": "m", "mode": "enforce", "ttl_s": 60},
     "enforce takes no expiry"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "payload", "reason"),
    [r[1:] for r in MODE_REJECTIONS],
    ids=[r[0] for r in MODE_REJECTIONS],
)
def test_f7_mode_switch_rejected(
    tree: PowerTree, limits: CommandLimits, payload: dict[str, Any], reason: str
) -> None:
    """On c203a14 every one of these was accepted: anonymous, and advisory for good."""
    rec = Recorder()
    ack, _ = CommandProcessor(tree, limits).handle(json.dumps(payload), NOW_S, rec)
    assert not ack.accepted and rec.applied == []
    assert ack.reason is not None and reason in ack.reason, ack.reason


def test_non_utc_offset_is_understood(tree: PowerTree) -> None:
    local = datetime.fromtimestamp(NOW_S + 7200, UTC).astimezone().isoformat()
    ack, [cmd] = handle(tree, dr(expires_at=local))
    assert ack.accepted, ack.reason
    assert isinstance(cmd, DemandResponse)
    assert cmd.expires_at_s(NOW_S) == pytest.approx(NOW_S + 7200)


# ---------------------------------------------------------------------------
# rejected, with the reason


REJECTIONS: list[tuple[str, dict[str, Any] | str, str | None, str]] = [
    ("not json", "limit rack-1 to 5 kW", None, "not valid JSON"),
    ("empty payload", "", None, "not valid JSON"),
    ("json array", "[1, 2]", None, "must be a JSON object"),
    ("no command_id", dr(command_id=None), None, "command_id: required field is missing"),
    ("empty command_id", dr(command_id=""), None, "command_id: String should have at least 1"),
    ("unknown type", dr(type="reboot"), "dr-1", "type must be one of"),
    ("no type", dr(type=None), "dr-1", "type must be one of"),
    ("unknown field", dr(priority="high"), "dr-1", "priority: unknown field"),
    ("above rating", dr(limit_w=8001), "dr-1", "limit_w 8001 W is above the rating of rack-1"),
    (
        "override above rating",
        env(envelope_w=16500),
        "env-1",
        "envelope_w 16500 W is above the rating of row (16000 W)",
    ),
    ("below floor", dr(limit_w=1199), "dr-1", "below what rack-1 can be brought down to (1200 W"),
    ("unknown node", dr(node="rack-9"), "dr-1", "unknown node 'rack-9' in site 'tiny'"),
    ("gpu server", dr(node="rack-1-n1", limit_w=1000), "dr-1", "'rack-1-n1' is a node"),
    ("gpu", dr(node="rack-1-n1-g0", limit_w=300), "dr-1", "is a gpu"),
    ("no expiry", dr(expires_at=None), "dr-1", "an expiry is required"),
    ("both expiries", dr(ttl_s=60), "dr-1", "either expires_at or ttl_s, not both"),
    ("past expiry", dr(expires_at=at(-1)), "dr-1", "is not in the future"),
    ("expiry now", dr(expires_at=at(0)), "dr-1", "is not in the future"),
    ("too short", dr(expires_at=None, ttl_s=0.5), "dr-1", "less than the minimum 1 s"),
    ("too far", dr(expires_at=at(2 * 86400)), "dr-1", "more than the maximum 86400 s"),
    ("naive time", dr(expires_at="2030-01-01T00:00:00"), "dr-1", "timezone"),
    ("epoch time", dr(expires_at=NOW_S + 60), "dr-1", "expires_at: Input should be a valid"),
    ("zero ttl", dr(expires_at=None, ttl_s=0), "dr-1", "ttl_s: Input should be greater than 0"),
    ("string watts", dr(limit_w="5000"), "dr-1", "limit_w: Input should be a valid number"),
    ("bool watts", dr(limit_w=True), "dr-1", "limit_w: Input should be a valid number"),
    ("negative watts", dr(limit_w=-5), "dr-1", "limit_w: Input should be greater than 0"),
    (
        "nan watts",
        '{"type":"demand_response","command_id":"n","node":"rack-1","limit_w":NaN,"ttl_s":60}',
        "n",
        "finite number",
    ),
    ("bad mode", {"type": "mode", "command_id": "m", "mode": "off"}, "m", "mode: Input should be"),
    ("node as number", dr(node=7), "dr-1", "node: Input should be a valid string"),
]


@pytest.mark.parametrize(
    ("payload", "command_id", "reason"),
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
def test_rejected_with_reason(
    tree: PowerTree, payload: dict[str, Any] | str, command_id: str | None, reason: str
) -> None:
    ack, applied = handle(tree, payload)
    assert ack.status == "rejected"
    assert applied == []
    assert ack.command_id == command_id
    assert ack.reason is not None and reason in ack.reason, ack.reason
    body = json.loads(ack.payload())
    assert body["status"] == "rejected" and body["command_id"] == command_id
    assert reason in body["reason"]


def test_several_problems_are_all_named(tree: PowerTree) -> None:
    ack, _ = handle(tree, dr(limit_w="x", expires_at=None, extra=1))
    assert ack.reason is not None
    for part in ("limit_w:", "extra: unknown field"):
        assert part in ack.reason, ack.reason


def test_custom_limits_bound_the_expiry(tree: PowerTree) -> None:
    proc = CommandProcessor(tree, CommandLimits(min_ttl_s=10, max_ttl_s=60))

    def ok(payload: dict[str, Any]) -> bool:
        return proc.handle(json.dumps(payload), NOW_S, Recorder())[0].accepted

    assert not ok(dr(command_id="a", expires_at=at(61)))
    assert not ok(dr(command_id="b", ttl_s=5, expires_at=None))
    assert ok(dr(command_id="c", expires_at=at(60)))


def test_refusal_by_the_daemon_is_acked_and_not_applied(tree: PowerTree) -> None:
    def refuse(cmd: Command) -> None:
        raise CommandRefused("site is in maintenance")

    ack, cmd = CommandProcessor(tree).handle(json.dumps(dr()), NOW_S, refuse)
    assert cmd is None
    assert ack.status == "rejected"
    assert ack.reason == "refused by the controller: site is in maintenance"


# ---------------------------------------------------------------------------
# dedupe


def test_repeated_command_id_is_applied_once_and_answered_with_the_first_outcome(
    tree: PowerTree,
) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    first, _ = proc.handle(json.dumps(dr()), NOW_S, rec)
    again, cmd = proc.handle(json.dumps(dr()), NOW_S + 5, rec)
    assert len(rec.applied) == 1
    assert cmd is None
    assert (again.status, again.duplicate, first.duplicate) == ("accepted", True, False)
    assert again.expires_at_s == first.expires_at_s
    assert again.ts_s == NOW_S + 5
    assert again.reason is not None and "duplicate command_id" in again.reason
    assert "payload differs" not in again.reason


def test_reused_id_with_another_payload_is_not_applied(tree: PowerTree) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    proc.handle(json.dumps(dr(limit_w=5000)), NOW_S, rec)
    again, _ = proc.handle(json.dumps(dr(limit_w=3000)), NOW_S, rec)
    assert [c.limit_w for c in rec.applied if isinstance(c, DemandResponse)] == [5000]
    assert again.duplicate and again.reason is not None
    assert "payload differs" in again.reason


def test_rejected_id_stays_rejected_even_when_fixed(tree: PowerTree) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    first, _ = proc.handle(json.dumps(dr(limit_w=9000)), NOW_S, rec)
    again, _ = proc.handle(json.dumps(dr(limit_w=5000)), NOW_S, rec)
    assert rec.applied == []
    assert (first.status, again.status, again.duplicate) == ("rejected", "rejected", True)
    assert again.reason is not None and "above the rating" in again.reason
    fresh, _ = proc.handle(json.dumps(dr(command_id="dr-2", limit_w=5000)), NOW_S, rec)
    assert fresh.accepted and len(rec.applied) == 1


def test_schema_rejection_is_remembered_by_its_id(tree: PowerTree) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    proc.handle(json.dumps(dr(expires_at=None)), NOW_S, rec)
    again, _ = proc.handle(json.dumps(dr()), NOW_S, rec)
    assert again.duplicate and again.status == "rejected" and rec.applied == []


def test_bad_json_is_never_a_duplicate(tree: PowerTree) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    a, _ = proc.handle(b"{", NOW_S, rec)
    b, _ = proc.handle(b"{", NOW_S, rec)
    assert (a.duplicate, b.duplicate, b.command_id) == (False, False, None)


def test_ledger_is_bounded_and_forgets_the_oldest(tree: PowerTree) -> None:
    proc, rec = CommandProcessor(tree, ledger_size=2), Recorder()
    for cid in ("a", "b", "c"):
        proc.handle(json.dumps(dr(command_id=cid)), NOW_S, rec)
    again_c, _ = proc.handle(json.dumps(dr(command_id="c")), NOW_S, rec)
    assert again_c.duplicate
    again_a, _ = proc.handle(json.dumps(dr(command_id="a")), NOW_S, rec)
    assert not again_a.duplicate  # forgotten: bounded memory over a long run
    assert len(rec.applied) == 4


# ---------------------------------------------------------------------------
# hostile input (issue 11): each of these raised, was kept, or was echoed on c203a14


@pytest.mark.parametrize(
    "expires_at",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z"],
)
def test_f3_out_of_range_expiry_is_rejected_not_raised(tree: PowerTree, expires_at: str) -> None:
    for payload in (dr(expires_at=expires_at), env(ttl_s=None, expires_at=expires_at)):
        ack, applied = handle(tree, payload)
        assert not ack.accepted and applied == []
        assert ack.reason is not None and "expires_at" in ack.reason, ack.reason
        json.loads(ack.payload())  # the ack itself can be built and sent


def test_f3_a_bug_in_apply_is_acked_as_internal_error_not_raised(tree: PowerTree) -> None:
    def broken(_cmd: Command) -> None:
        raise KeyError("a bug")

    proc = CommandProcessor(tree)
    ack, cmd = proc.handle(json.dumps(dr()), NOW_S, broken)
    assert (ack.status, ack.reason, cmd) == ("rejected", "internal error", None)
    assert proc.internal_errors == 1


def test_f3_format_ts_survives_any_float() -> None:
    for ts in (-1e300, 1e300, float("nan"), float("inf"), -62135596800.0 - 86400):
        assert isinstance(format_ts(ts), str)


@pytest.mark.parametrize(
    ("bad_id", "why"),
    [
        ("x" * 129, "129 characters"),
        ("x" * (1 << 20), "1048576 characters"),
        ("a b", "3 characters"),
        ("cmd\n1", "5 characters"),
        ('{"$ne": 1}', "10 characters"),
    ],
    ids=["129", "1MiB", "space", "newline", "braces"],
)
def test_f5_invalid_id_is_neither_echoed_nor_remembered(
    tree: PowerTree, bad_id: str, why: str
) -> None:
    proc, rec = CommandProcessor(tree), Recorder()
    ack, _ = proc.handle(json.dumps(dr(command_id=bad_id)), NOW_S, rec)
    assert ack.command_id is None and not ack.accepted and rec.applied == []
    assert ack.reason is not None
    if len(bad_id) < 1000:
        assert why in ack.reason and "sha256" in ack.reason, ack.reason
    assert len(ack.payload()) < 1024
    assert len(proc._seen) == 0


def test_f5_oversized_payload_is_refused_before_parsing(tree: PowerTree) -> None:
    from controller.core.setpoints import MAX_PAYLOAD_B

    big = json.dumps(dr(command_id="ok-id", pad="x" * MAX_PAYLOAD_B))
    ack, _ = handle(tree, big)
    assert ack.command_id is None and ack.reason is not None
    assert f"more than the {MAX_PAYLOAD_B} allowed" in ack.reason


def test_f5_safe_ids_still_work(tree: PowerTree) -> None:
    for cid in ("bms-2025-0611-001", "a" * 128, "site/hall:dr@7.1_x", "550e8400-e29b-41d4"):
        ack, _ = handle(tree, dr(command_id=cid))
        assert ack.accepted and ack.command_id == cid, ack.reason
