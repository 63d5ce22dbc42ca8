"""Commands from the building management system: schema, validation, dedupe and the ack.

A BMS command changes how much power the site may draw, so every one is checked
against the power tree before it is accepted, and every one gets an answer saying why.
Refusing (rather than clamping) an out-of-range value is deliberate: a BMS that asked for
12 kW and silently got 15 kW would plan with the wrong number.

Everything here is pure: time comes in as ``now_s`` (``time.time()`` seconds, because the
BMS speaks wall-clock times), so the validation tables run without a broker or a clock.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from controller.topology import CONSTRAINT_KINDS, PowerTree

CommandId = Annotated[str, Field(min_length=1, max_length=128)]
PositiveW = Annotated[float, Field(gt=0)]
PositiveS = Annotated[float, Field(gt=0)]


class _CommandBase(BaseModel):
    """Strict JSON: ``"5"`` is not a number, ``true`` is not 1, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    command_id: CommandId


class _TimedCommand(_CommandBase):
    """A command that lapses by itself: the BMS must say until when (or for how long)."""

    node: Annotated[str, Field(min_length=1)]
    expires_at: AwareDatetime | None = None
    ttl_s: PositiveS | None = None

    @model_validator(mode="after")
    def _one_expiry(self) -> _TimedCommand:
        if self.expires_at is None and self.ttl_s is None:
            raise ValueError(
                "an expiry is required: give expires_at (RFC 3339 with timezone) or ttl_s"
            )
        if self.expires_at is not None and self.ttl_s is not None:
            raise ValueError("give either expires_at or ttl_s, not both")
        return self

    def expires_at_s(self, received_s: float) -> float:
        """Absolute expiry (``time.time()`` seconds); a TTL counts from reception."""
        if self.expires_at is not None:
            return self.expires_at.timestamp()
        assert self.ttl_s is not None  # guaranteed by _one_expiry
        return received_s + self.ttl_s


class EnvelopeOverride(_TimedCommand):
    """Replace a node's configured envelope with ``envelope_w`` until the expiry."""

    type: Literal["envelope_override"]
    envelope_w: PositiveW


class DemandResponse(_TimedCommand):
    """Hold a node at or below ``limit_w`` until the expiry (never raises its envelope)."""

    type: Literal["demand_response"]
    limit_w: PositiveW


class ModeSwitch(_CommandBase):
    """``advisory``: compute and publish, change nothing; ``enforce``: act."""

    type: Literal["mode"]
    mode: Literal["enforce", "advisory"]


Command = EnvelopeOverride | DemandResponse | ModeSwitch
TimedCommand = EnvelopeOverride | DemandResponse
COMMAND_TYPES: tuple[str, ...] = ("envelope_override", "demand_response", "mode")

_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(
    Annotated[Command, Field(discriminator="type")]
)


@dataclass(frozen=True)
class CommandLimits:
    """Bounds on expiries: long enough not to lapse in transit, short enough to be revisited."""

    min_ttl_s: float = 1.0
    max_ttl_s: float = 24 * 3600.0


DEFAULT_LIMITS = CommandLimits()


def format_ts(ts_s: float) -> str:
    """RFC 3339 UTC with milliseconds, the form every timestamp on the BMS topics takes."""
    return (
        datetime.fromtimestamp(ts_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True)
class Ack:
    """The answer to one command, published on the ack topic."""

    command_id: str | None
    type: str | None
    status: Literal["accepted", "rejected"]
    reason: str | None
    ts_s: float
    duplicate: bool = False
    expires_at_s: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_json(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "duplicate": self.duplicate,
            "expires_at": None if self.expires_at_s is None else format_ts(self.expires_at_s),
            "ts": format_ts(self.ts_s),
        }

    def payload(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


class CommandRejected(Exception):
    """A command that will not be applied, with the reason the BMS is told."""

    def __init__(
        self, reason: str, command_id: str | None = None, command_type: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.command_type = command_type


class CommandRefused(Exception):
    """Raised by the daemon's ``on_command`` to refuse a valid command (reason goes to the BMS)."""


def _error_lines(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in COMMAND_TYPES:  # the discriminator tag, not a field
            loc = loc[1:]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            msg = f"type must be one of {', '.join(COMMAND_TYPES)}"
            loc = ["type"]
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_command(payload: bytes | str) -> Command:
    """JSON and schema only; raises :class:`CommandRejected` carrying whatever id it found."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandRejected(f"payload is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CommandRejected("payload must be a JSON object")
    command_id = raw.get("command_id")
    command_id = command_id if isinstance(command_id, str) and command_id else None
    command_type = raw.get("type") if isinstance(raw.get("type"), str) else None
    try:
        return _COMMAND_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        raise CommandRejected(_error_lines(exc), command_id, command_type) from None


def check_command(
    cmd: Command, tree: PowerTree, now_s: float, limits: CommandLimits = DEFAULT_LIMITS
) -> Command:
    """Check a parsed command against the tree and the clock; return it with a fixed expiry.

    A ``ttl_s`` becomes an absolute ``expires_at`` here, so whoever applies the command
    later (and the ack) sees the same deadline.
    """
    if isinstance(cmd, ModeSwitch):
        return cmd

    def reject(reason: str) -> CommandRejected:
        return CommandRejected(reason, cmd.command_id, cmd.type)

    if cmd.node not in tree:
        raise reject(f"unknown node {cmd.node!r} in site {tree.site.name!r}")
    node = tree.node(cmd.node)
    if node.kind not in CONSTRAINT_KINDS:
        raise reject(
            f"node {cmd.node!r} is a {node.kind}; envelopes are enforced on "
            f"{', '.join(CONSTRAINT_KINDS)}"
        )
    field, value_w = (
        ("envelope_w", cmd.envelope_w)
        if isinstance(cmd, EnvelopeOverride)
        else ("limit_w", cmd.limit_w)
    )
    if value_w > node.rating_w:
        raise reject(
            f"{field} {value_w:g} W is above the rating of {cmd.node} ({node.rating_w:g} W)"
        )
    floor_w = tree.floor_draw_w(cmd.node)
    if value_w < floor_w:
        raise reject(
            f"{field} {value_w:g} W is below what {cmd.node} can be brought down to "
            f"({floor_w:g} W: every GPU at its floor plus baselines)"
        )
    expires_s = cmd.expires_at_s(now_s)
    ahead_s = expires_s - now_s
    if ahead_s <= 0:
        raise reject(
            f"expires_at {format_ts(expires_s)} is not in the future "
            f"(controller time {format_ts(now_s)})"
        )
    if ahead_s < limits.min_ttl_s:
        raise reject(
            f"expiry is {ahead_s:.3g} s ahead, less than the minimum {limits.min_ttl_s:g} s"
        )
    if ahead_s > limits.max_ttl_s:
        raise reject(
            f"expiry is {ahead_s:.0f} s ahead, more than the maximum {limits.max_ttl_s:.0f} s"
        )
    return cmd.model_copy(
        update={"expires_at": datetime.fromtimestamp(expires_s, UTC), "ttl_s": None}
    )


@dataclass(frozen=True)
class _Seen:
    ack: Ack
    digest: str


class CommandProcessor:
    """Parse, dedupe, check, apply, answer: the whole life of one command, minus the wire.

    Every outcome that carries a ``command_id`` is remembered (the last ``ledger_size``
    ids), accepted or rejected: a repeated id is answered with its first outcome and
    ``duplicate: true`` and is never applied again. A BMS fixes a rejected command by
    sending it with a new id.
    """

    def __init__(
        self,
        tree: PowerTree,
        limits: CommandLimits = DEFAULT_LIMITS,
        ledger_size: int = 10_000,
    ) -> None:
        self.tree = tree
        self.limits = limits
        self.ledger_size = ledger_size
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def handle(
        self, payload: bytes | str, now_s: float, apply: Callable[[Command], None]
    ) -> tuple[Ack, Command | None]:
        """The ack to publish and, when accepted, the command that ``apply`` was given.

        ``apply`` may raise :class:`CommandRefused` to turn a valid command down.
        """
        digest = hashlib.sha256(
            payload if isinstance(payload, bytes) else payload.encode()
        ).hexdigest()
        try:
            cmd = parse_command(payload)
        except CommandRejected as exc:
            return self._rejected(exc, now_s, digest), None
        if (seen := self._seen.get(cmd.command_id)) is not None:
            return self._duplicate(seen, digest, now_s), None
        try:
            cmd = check_command(cmd, self.tree, now_s, self.limits)
            apply(cmd)
        except CommandRejected as exc:
            return self._rejected(exc, now_s, digest), None
        except CommandRefused as exc:
            return self._rejected(
                CommandRejected(f"refused by the controller: {exc}", cmd.command_id, cmd.type),
                now_s,
                digest,
            ), None
        expires_s = None if isinstance(cmd, ModeSwitch) else cmd.expires_at_s(now_s)
        ack = Ack(cmd.command_id, cmd.type, "accepted", None, now_s, expires_at_s=expires_s)
        self._remember(ack, digest)
        return ack, cmd

    def _rejected(self, exc: CommandRejected, now_s: float, digest: str) -> Ack:
        if exc.command_id is not None and (seen := self._seen.get(exc.command_id)):
            return self._duplicate(seen, digest, now_s)
        ack = Ack(exc.command_id, exc.command_type, "rejected", exc.reason, now_s)
        if ack.command_id is not None:
            self._remember(ack, digest)
        return ack

    def _duplicate(self, seen: _Seen, digest: str, now_s: float) -> Ack:
        note = "duplicate command_id: not applied again, this is the original outcome"
        if digest != seen.digest:
            note += " (the payload differs from the original)"
        reason = note if seen.ack.reason is None else f"{seen.ack.reason} [{note}]"
        return replace(seen.ack, reason=reason, ts_s=now_s, duplicate=True)

    def _remember(self, ack: Ack, digest: str) -> None:
        assert ack.command_id is not None
        self._seen[ack.command_id] = _Seen(ack, digest)
        while len(self._seen) > self.ledger_size:
            self._seen.popitem(last=False)
