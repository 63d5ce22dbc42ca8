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
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from controller.model.topology import CONSTRAINT_KINDS, PowerTree

log = logging.getLogger(__name__)

# A command id is echoed in the ack and kept in the dedupe ledger, so it is bounded in
# length and charset (F5: 1 MiB ids were kept and echoed). An id outside these bounds is
# never echoed or remembered: the ack names it by its length and a hash prefix.
COMMAND_ID_MAX = 128
COMMAND_ID_CHARS = "A-Z a-z 0-9 . _ : @ / -"
_COMMAND_ID_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
# Checked on the raw bytes before any JSON parsing: a command is a few hundred bytes.
MAX_PAYLOAD_B = 64 * 1024

CommandId = Annotated[
    str, Field(min_length=1, max_length=COMMAND_ID_MAX, pattern=r"^[A-Za-z0-9._:@/-]+$")
]
PositiveW = Annotated[float, Field(gt=0)]
PositiveS = Annotated[float, Field(gt=0)]


class _CommandBase(BaseModel):
    """Strict JSON: ``"5"`` is not a number, ``true`` is not 1, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    command_id: CommandId


_EXPIRY_REQUIRED = "an expiry is required: give expires_at (RFC 3339 with timezone) or ttl_s"


class _Expiring(_CommandBase):
    """A command that may lapse by itself: until when (or for how long)."""

    expires_at: AwareDatetime | None = None
    ttl_s: PositiveS | None = None

    @model_validator(mode="after")
    def _at_most_one_expiry(self) -> _Expiring:
        if self.expires_at is not None and self.ttl_s is not None:
            raise ValueError("give either expires_at or ttl_s, not both")
        if self.expires_at is not None:
            # F3: an aware time near year 1 or 9999 cannot be converted to UTC or to a
            # timestamp; refuse it here (it becomes the ack's reason), not deep in a check.
            try:
                self.expires_at.astimezone(UTC).timestamp()
            except (ValueError, OverflowError, OSError):
                raise ValueError("expires_at: out of range (cannot be converted to UTC)") from None
        return self

    @property
    def has_expiry(self) -> bool:
        return self.expires_at is not None or self.ttl_s is not None

    def expires_at_s(self, received_s: float) -> float:
        """Absolute expiry (``time.time()`` seconds); a TTL counts from reception."""
        if self.expires_at is not None:
            return self.expires_at.timestamp()
        assert self.ttl_s is not None  # callers check has_expiry
        return received_s + self.ttl_s


class _TimedCommand(_Expiring):
    """A command that lapses by itself: the BMS must say until when (or for how long)."""

    node: Annotated[str, Field(min_length=1)]

    @model_validator(mode="after")
    def _one_expiry(self) -> _TimedCommand:
        if not self.has_expiry:
            raise ValueError(_EXPIRY_REQUIRED)
        return self


class EnvelopeOverride(_TimedCommand):
    """Replace a node's configured envelope with ``envelope_w`` until the expiry."""

    type: Literal["envelope_override"]
    envelope_w: PositiveW


class DemandResponse(_TimedCommand):
    """Hold a node at or below ``limit_w`` until the expiry (never raises its envelope)."""

    type: Literal["demand_response"]
    limit_w: PositiveW


class ModeSwitch(_Expiring):
    """``advisory``: compute and publish, change nothing; ``enforce``: act.

    F7: advisory switches protection off, so it must lapse by itself (``expires_at`` or
    ``ttl_s``, bounded by ``CommandLimits.max_advisory_s``); ``enforce`` is what the
    controller returns to, so it takes no expiry.
    """

    type: Literal["mode"]
    mode: Literal["enforce", "advisory"]

    @model_validator(mode="after")
    def _expiry_for_advisory(self) -> ModeSwitch:
        if self.mode == "advisory" and not self.has_expiry:
            raise ValueError(_EXPIRY_REQUIRED + " (advisory mode must lapse by itself)")
        if self.mode == "enforce" and self.has_expiry:
            raise ValueError("enforce takes no expiry: it is the mode the controller returns to")
        return self


Command = EnvelopeOverride | DemandResponse | ModeSwitch
TimedCommand = EnvelopeOverride | DemandResponse
COMMAND_TYPES: tuple[str, ...] = ("envelope_override", "demand_response", "mode")

_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(
    Annotated[Command, Field(discriminator="type")]
)


@dataclass(frozen=True)
class CommandLimits:
    """Bounds on expiries: long enough not to lapse in transit, short enough to be revisited.

    ``allow_mode_commands`` is off by default (F7): MQTT 3.1.1 does not tell the
    controller who sent a command, and ``mode`` turns every protection off, so a site
    opts in (``integrations.mqtt.allow_mode_commands``) once its broker ACL lets only the
    BMS publish on the command topic. ``max_advisory_s`` bounds how long advisory lasts.
    """

    min_ttl_s: float = 1.0
    max_ttl_s: float = 24 * 3600.0
    allow_mode_commands: bool = False
    max_advisory_s: float = 3600.0


DEFAULT_LIMITS = CommandLimits()


def format_ts(ts_s: float) -> str:
    """RFC 3339 UTC with milliseconds, the form every timestamp on the BMS topics takes.

    A time outside what ``datetime`` can hold (F3: it arrives from the wire) is shown as
    seconds since the epoch instead of raising.
    """
    try:
        return (
            datetime.fromtimestamp(ts_s, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    except (ValueError, OverflowError, OSError):
        return f"{ts_s:.0f} s since the epoch"


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


def valid_command_id(value: object) -> bool:
    """An id that may be echoed and remembered: a string of 1-128 safe characters."""
    return isinstance(value, str) and _COMMAND_ID_RE.fullmatch(value) is not None


def describe_bad_id(value: str) -> str:
    """How an ack names an id it will not echo: its length and a hash prefix to match on."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return (
        f"command_id is not a valid id ({len(value)} characters, sha256 {digest}...): "
        f"ids are 1-{COMMAND_ID_MAX} characters of {COMMAND_ID_CHARS}"
    )


def parse_command(payload: bytes | str) -> Command:
    """Size, JSON and schema; raises :class:`CommandRejected` with the id if it is valid."""
    size_b = len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8", "replace"))
    if size_b > MAX_PAYLOAD_B:
        raise CommandRejected(
            f"payload is {size_b} bytes, more than the {MAX_PAYLOAD_B} allowed (not parsed)"
        )
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CommandRejected(f"payload is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise CommandRejected("payload must be a JSON object")
    raw_id = raw.get("command_id")
    command_id = raw_id if valid_command_id(raw_id) else None
    raw_type = raw.get("type")
    command_type = raw_type if isinstance(raw_type, str) and raw_type in COMMAND_TYPES else None
    try:
        return _COMMAND_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        reason = _error_lines(exc)
        if isinstance(raw_id, str) and raw_id and command_id is None:
            reason = f"{describe_bad_id(raw_id)}; {reason}"
        raise CommandRejected(reason, command_id, command_type) from None


def check_command(
    cmd: Command, tree: PowerTree, now_s: float, limits: CommandLimits = DEFAULT_LIMITS
) -> Command:
    """Check a parsed command against the tree and the clock; return it with a fixed expiry.

    A ``ttl_s`` becomes an absolute ``expires_at`` here, so whoever applies the command
    later (and the ack) sees the same deadline.
    """

    def reject(reason: str) -> CommandRejected:
        return CommandRejected(reason, cmd.command_id, cmd.type)

    if isinstance(cmd, ModeSwitch):
        if not limits.allow_mode_commands:
            raise reject(
                "mode commands are disabled on this controller: a site enables them with "
                "integrations.mqtt.allow_mode_commands once its broker ACL lets only the "
                "BMS publish commands"
            )
        if cmd.mode == "enforce":
            return cmd
        return _fix_expiry(cmd, now_s, limits.min_ttl_s, limits.max_advisory_s, reject)

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
    if isinstance(cmd, EnvelopeOverride) and value_w > node.envelope_w:
        # F8: the policy only ever lowers an envelope, so a raise was acked and ignored.
        # Raising is a change to the reviewed site config (checked by ``validate`` for
        # feasibility and A/B feeds), not something one broker message may do.
        raise reject(
            f"envelope_w {value_w:g} W is above the configured envelope of {cmd.node} "
            f"({node.envelope_w:g} W): a BMS override may only lower an envelope; "
            "raise it in the site config"
        )
    floor_w = tree.floor_draw_w(cmd.node)
    if value_w < floor_w:
        raise reject(
            f"{field} {value_w:g} W is below what {cmd.node} can be brought down to "
            f"({floor_w:g} W: every GPU at its floor plus baselines)"
        )
    return _fix_expiry(cmd, now_s, limits.min_ttl_s, limits.max_ttl_s, reject)


_C = TypeVar("_C", bound=_Expiring)


def _fix_expiry(
    cmd: _C,
    now_s: float,
    min_s: float,
    max_s: float,
    reject: Callable[[str], CommandRejected],
) -> _C:
    """Check the expiry is ``min_s`` to ``max_s`` ahead; return the command with it absolute."""
    expires_s = cmd.expires_at_s(now_s)
    ahead_s = expires_s - now_s
    if ahead_s <= 0:
        raise reject(
            f"expires_at {format_ts(expires_s)} is not in the future "
            f"(controller time {format_ts(now_s)})"
        )
    if ahead_s < min_s:
        raise reject(f"expiry is {ahead_s:.3g} s ahead, less than the minimum {min_s:g} s")
    if ahead_s > max_s:
        raise reject(f"expiry is {ahead_s:.0f} s ahead, more than the maximum {max_s:.0f} s")
    return cmd.model_copy(
        update={"expires_at": datetime.fromtimestamp(expires_s, UTC), "ttl_s": None}
    )


@dataclass(frozen=True)
class _Seen:
    ack: Ack
    digest: str


class CommandProcessor:
    """Parse, dedupe, check, apply, answer: the whole life of one command, minus the wire.

    Every outcome that carries a valid ``command_id`` (see :func:`valid_command_id`) is
    remembered (the last ``ledger_size`` ids), accepted or rejected; an invalid id is
    neither remembered nor echoed (F5): a repeated id is answered with its first outcome and
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
        self.internal_errors = 0

    def handle(
        self, payload: bytes | str, now_s: float, apply: Callable[[Command], None]
    ) -> tuple[Ack, Command | None]:
        """The ack to publish and, when accepted, the command that ``apply`` was given.

        ``apply`` may raise :class:`CommandRefused` to turn a valid command down. Nothing
        a payload contains raises out of here (F3): a bug is acked ``rejected: internal
        error``, logged with its traceback the first time, and counted.
        """
        try:
            return self._handle(payload, now_s, apply)
        except Exception:
            self.internal_errors += 1
            if self.internal_errors == 1:
                log.exception("bms: internal error handling a command (further ones are counted)")
            else:
                log.error(
                    "bms: internal error handling a command (%d so far)", self.internal_errors
                )
            return Ack(None, None, "rejected", "internal error", now_s), None

    def _handle(
        self, payload: bytes | str, now_s: float, apply: Callable[[Command], None]
    ) -> tuple[Ack, Command | None]:
        digest = hashlib.sha256(
            payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
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
        expires_s = cmd.expires_at_s(now_s) if cmd.has_expiry else None
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
