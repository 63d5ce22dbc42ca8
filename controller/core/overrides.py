"""Envelopes the BMS has set for a while: overrides and demand-response limits, with expiry.

Pure (time comes in as ``now_s``, ``time.time()`` seconds like the commands' expiries), so
the control cycle can ask for the envelopes in force without touching a clock or a lock:
the BMS link and the cycle share one event loop.

How the two kinds combine on one node: an envelope override *replaces* the configured
envelope with a lower one; a demand-response limit *caps* whatever envelope is in force.
Neither raises an envelope (F8: a raise was acked and then ignored by the policy, which
takes the minimum; :func:`~controller.core.setpoints.check_command` now refuses it, and
:meth:`EnvelopeOverrides.active` never reports more than the configured envelope, so
what the API and telemetry say is in force is what the policy uses, also after a reload
that lowered the configured value). A newer command of the same kind on the same node
replaces the older one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from controller.core.setpoints import DemandResponse, EnvelopeOverride, TimedCommand
from controller.model.topology import PowerTree

OverrideKind = Literal["envelope_override", "demand_response"]


@dataclass(frozen=True, slots=True)
class ActiveOverride:
    """One BMS setting in force: what, where, until when, and which command set it."""

    node: str
    kind: OverrideKind
    value_w: float
    expires_at_s: float
    command_id: str
    applied_at_s: float


class EnvelopeOverrides:
    """The store the BMS link writes and the control cycle reads."""

    def __init__(self, tree: PowerTree) -> None:
        self._tree = tree
        self._entries: dict[tuple[str, OverrideKind], ActiveOverride] = {}

    def apply(self, cmd: TimedCommand, now_s: float) -> ActiveOverride:
        """Record a checked command (see :func:`controller.core.setpoints.check_command`)."""
        if cmd.node not in self._tree:
            raise KeyError(f"no node {cmd.node!r}")
        value_w = cmd.envelope_w if isinstance(cmd, EnvelopeOverride) else cmd.limit_w
        kind: OverrideKind = (
            "envelope_override" if isinstance(cmd, EnvelopeOverride) else "demand_response"
        )
        assert isinstance(cmd, EnvelopeOverride | DemandResponse)
        entry = ActiveOverride(
            node=cmd.node,
            kind=kind,
            value_w=value_w,
            expires_at_s=cmd.expires_at_s(now_s),
            command_id=cmd.command_id,
            applied_at_s=now_s,
        )
        self._entries[(cmd.node, kind)] = entry
        return entry

    def expire(self, now_s: float) -> tuple[ActiveOverride, ...]:
        """Drop what has run out (an expiry at exactly ``now_s`` has run out); return it."""
        gone = tuple(e for e in self._entries.values() if e.expires_at_s <= now_s)
        for e in gone:
            del self._entries[(e.node, e.kind)]
        return gone

    def entries(self, now_s: float) -> tuple[ActiveOverride, ...]:
        """Everything in force, for the API and the audit trail."""
        self.expire(now_s)
        return tuple(self._entries.values())

    def active(self, now_s: float) -> dict[str, float]:
        """Envelope (W) of every node the BMS currently constrains; other nodes keep theirs."""
        self.expire(now_s)
        overrides: dict[str, float] = {}
        limits: dict[str, float] = {}
        for (node, kind), e in self._entries.items():
            (overrides if kind == "envelope_override" else limits)[node] = e.value_w
        out: dict[str, float] = {}
        for node in overrides.keys() | limits.keys():
            configured_w = self._tree.node(node).envelope_w
            envelope_w = min(overrides.get(node, configured_w), configured_w)
            out[node] = min(envelope_w, limits.get(node, envelope_w))
        return out

    def replace_tree(self, tree: PowerTree) -> tuple[ActiveOverride, ...]:
        """After a config reload: keep settings for nodes that still exist, return the rest."""
        self._tree = tree
        dropped = tuple(e for e in self._entries.values() if e.node not in tree)
        for e in dropped:
            del self._entries[(e.node, e.kind)]
        return dropped

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> Mapping[tuple[str, OverrideKind], ActiveOverride]:
        return dict(self._entries)


ModeName = Literal["enforce", "advisory"]


@dataclass(frozen=True, slots=True)
class ModeHold:
    """A BMS ``mode: advisory`` in force until ``until_s``, then ``revert_to`` (F7).

    Advisory switches every protection off, so it always lapses by itself; the mode the
    controller had before the first advisory command comes back (normally ``enforce``),
    logged and audited by the daemon. A later advisory command moves the expiry; an
    ``enforce`` command ends the hold at once.
    """

    mode: ModeName
    until_s: float
    command_id: str
    revert_to: ModeName
    set_at_s: float

    def expired(self, now_s: float) -> bool:
        return now_s >= self.until_s
