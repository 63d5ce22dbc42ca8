"""Property: anything on the command topic gets exactly one ack, never an exception, and
changes nothing unless the ack says ``accepted`` (issue 11: sizes, types, F3, F5).

The real BmsLink and CommandProcessor, not connected: ``handle_command`` is what the
receiver calls for each message, so no broker is needed to feed it hostile payloads.
Bounded examples here (this runs in ``make test``); ``RACKPOWER_FUZZ_EXAMPLES=20000`` for
a longer run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controller.core.overrides import EnvelopeOverrides
from controller.core.setpoints import Command
from controller.integrations.bms.bridge import BmsLink
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

EXAMPLES = int(os.environ.get("RACKPOWER_FUZZ_EXAMPLES", "300"))

TREE = PowerTree(parse_site(tiny_site()))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
timestamps = st.sampled_from(
    [
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "2030-01-01T00:00:00",
        "1970-01-01T00:00:00Z",
        "not a time",
    ]
) | st.floats(min_value=-1e12, max_value=1e12).map(
    lambda off: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(0.0, time.time() + off)))
)
plausible = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["envelope_override", "demand_response", "mode", "x"])
        | json_values,
        "command_id": st.text(min_size=0, max_size=200) | json_values,
        "node": st.sampled_from(
            ["feed", "sst", "bus", "row", "rack-1", "rack-2", "rack-1-n1", "rack-1-n1-g0", "x"]
        )
        | json_values,
        "limit_w": st.floats() | st.integers() | json_values,
        "envelope_w": st.floats() | st.integers() | json_values,
        "ttl_s": st.floats() | st.integers() | json_values,
        "expires_at": timestamps | json_values,
        "mode": st.sampled_from(["advisory", "enforce"]) | json_values,
        "extra": json_values,
    },
)


# Mostly valid commands with one field possibly replaced: reaches acceptance and the
# checks behind the schema (rating, floor, configured envelope, expiry bounds).
near_valid = st.builds(
    lambda kind, cid, node, value_w, expiry, key, junk, mutate: {
        **(
            {"type": "mode", "mode": "advisory"}
            if kind == "mode"
            else {"type": kind, "node": node,
                  ("limit_w" if kind == "demand_response" else "envelope_w"): value_w}
        ),
        "command_id": cid,
        **expiry,
        **({key: junk} if mutate else {}),
    },
    st.sampled_from(["demand_response", "envelope_override", "mode"]),
    st.from_regex(r"[A-Za-z0-9._:@/-]{1,20}", fullmatch=True),
    st.sampled_from(["feed", "row", "rack-1", "rack-2"]),
    st.floats(min_value=500, max_value=21_000),
    st.floats(min_value=0.5, max_value=100_000).map(lambda t: {"ttl_s": t})
    | timestamps.map(lambda ts: {"expires_at": ts}),
    st.sampled_from(["type", "command_id", "node", "limit_w", "ttl_s", "expires_at", "mode"]),
    json_values | timestamps,
    st.booleans(),
)  # fmt: skip


def encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


payloads = (
    near_valid.map(encode)
    | plausible.map(encode)
    | json_values.map(encode)
    | st.binary(max_size=300)
    | st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))
)


class Sink:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    def __call__(self, cmd: Command) -> None:
        self.commands.append(cmd)


def new_link() -> tuple[BmsLink, Sink, EnvelopeOverrides]:
    sink, overrides = Sink(), EnvelopeOverrides(TREE)
    cfg = MqttConfig(url="mqtt://127.0.0.1:1", allow_mode_commands=True)
    return BmsLink(cfg, TREE, on_command=sink, overrides=overrides), sink, overrides


LINK, SINK, OVERRIDES = new_link()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_any_payload_gets_one_ack_and_changes_nothing_unless_accepted(payload: bytes) -> None:
    LINK._acks.clear()
    before_overrides = OVERRIDES.snapshot()
    before_commands = len(SINK.commands)
    LINK.handle_command(payload)  # must not raise
    [out] = list(LINK._acks)
    assert len(out.payload) < 2048
    ack = json.loads(out.payload)
    assert ack["status"] in ("accepted", "rejected")
    event(ack["status"])
    if ack["status"] == "accepted" and not ack["duplicate"]:
        assert len(SINK.commands) == before_commands + 1
    else:
        assert OVERRIDES.snapshot() == before_overrides
        assert len(SINK.commands) == before_commands
        assert ack["duplicate"] or ack["reason"]
    assert ack["reason"] != "internal error", payload  # a bug, not a hostile input
    cid = ack["command_id"]
    assert cid is None or (isinstance(cid, str) and len(cid) <= 128)


def test_property_saw_both_outcomes() -> None:
    """The strategies reach acceptance too (otherwise the property above proves little)."""
    link, sink, _ = new_link()
    now = time.time()
    ok = {"type": "demand_response", "command_id": "p-1", "node": "row", "limit_w": 9000,
          "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 120))}  # fmt: skip
    link.handle_command(encode(ok))
    assert json.loads(link._acks[-1].payload)["status"] == "accepted"
    assert len(sink.commands) == 1
