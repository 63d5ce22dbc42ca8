"""Messages between the controller and its node agents: leased caps down, telemetry up.

A cap is a *lease*, not a command: it holds for ``lease_s`` seconds after the agent
received it and then lapses into the agent's failsafe cap, so a controller that dies,
hangs or loses the network leaves every node at a known safe share instead of at
whatever it last said. Validation is strict (unknown keys, NaN, a bool for a number,
out-of-range values are errors), because a malformed cap must never half-apply.

Clocks: ``issued_at`` is the controller's wall clock and is only informational (logs,
audit). Expiry is judged by the agent on its own monotonic clock from the moment it
received the lease: hosts' wall clocks drift and jump (NTP steps, a wrong RTC), and a
lease that looked expired on arrival, or valid for an hour, because of clock skew would
defeat the point. ``seq`` orders leases from one controller; see :class:`LeaseSequence`.

The wire format is compact JSON (``model_dump_json``): telemetry carries per-GPU values
as parallel arrays indexed by the GPU's index on the node, not an object per GPU, since
a 2,500-GPU row sends a few hundred of these a second.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from controller.model.config import format_loc
from controller.model.wire_limits import ID_PATTERN, MAX_LEASE_S
from drivers.reading import Quality

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
# A GPU key: its index on the node ("3") or its site id ("r1-node-2-g3").
GPU_KEY_RE = re.compile(r"^(?:(?P<index>\d{1,3})|(?P<node>[A-Za-z0-9_.:-]+)-g(?P<k>\d{1,3}))$")
GpuKey = Annotated[str, StringConstraints(pattern=GPU_KEY_RE.pattern)]
CapW = Annotated[float, Field(gt=0, le=100_000)]
MAX_GPUS = 256
# Telemetry values are rounded to this (W): finer than NVML's useful precision, and it
# keeps payloads short.
ROUND_W = 1


class MessageError(ValueError):
    """A payload that is not a valid message; ``str()`` says which field and why."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Lease(_Message):
    """Power caps for the GPUs of one node, valid ``lease_s`` after the agent receives them.

    ``caps_w`` maps a GPU (index on the node as a string, or its site id
    ``<node>-g<k>``) to its cap in W. A GPU of the node the lease does not name is held
    at the agent's failsafe cap: only a lease grants a GPU anything but the safe share.
    ``agent_id``, when set, names the agent the lease is for (a misrouted lease is
    ignored). ``job_id`` and ``reason`` are for the audit trail and the agent's log.
    """

    v: Literal[1] = 1
    controller_id: Id
    seq: Annotated[int, Field(ge=0)]
    issued_at: Annotated[float, Field(gt=0)]
    lease_s: Annotated[float, Field(gt=0, le=MAX_LEASE_S)]
    caps_w: Annotated[dict[GpuKey, CapW], Field(min_length=1, max_length=MAX_GPUS)]
    agent_id: Id | None = None
    job_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None

    @field_validator("caps_w", mode="before")
    @classmethod
    def _index_keys(cls, value: Any) -> Any:
        # From Python, GPU indices may be given as ints; on the wire JSON keys are strings.
        if isinstance(value, Mapping):
            return {
                str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v
                for k, v in value.items()
            }
        return value

    @classmethod
    def issue(
        cls,
        controller_id: str,
        seq: int,
        caps_w: Mapping[int | str, float],
        lease_s: float,
        *,
        agent_id: str | None = None,
        job_id: str | None = None,
        reason: str | None = None,
        issued_at: float | None = None,
    ) -> Lease:
        """A validated lease from the controller side; GPUs by index (int) or site id."""
        return cls.model_validate(
            {
                "controller_id": controller_id,
                "seq": seq,
                "issued_at": time.time() if issued_at is None else issued_at,
                "lease_s": lease_s,
                "caps_w": dict(caps_w),
                "agent_id": agent_id,
                "job_id": job_id,
                "reason": reason,
            }
        )

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Refusal(_Message):
    """The last lease (or payload) the agent turned down, and why, for the controller."""

    seq: int | None
    reason: str


class Telemetry(_Message):
    """One agent's report: node state plus per-GPU arrays indexed by GPU index on the node.

    ``power_w`` is instantaneous (``NVML_FI_DEV_POWER_INSTANT``, or the 1 s average on
    GPUs without it), ``power_avg_w`` the 1 s average, ``limit_w`` the enforced limit,
    ``min_w``/``max_w`` NVML's limit range, ``q`` the quality of the GPU's sample. None
    (JSON null) where a value could not be read. ``seq`` is the last lease applied (None
    before any). ``ts`` is the agent's wall clock (for display): the controller judges
    staleness by when it received the message. ``lease_left_s`` is what is left of the
    current lease on the agent's clock.
    """

    v: Literal[1] = 1
    agent_id: Id
    node_id: Id
    ts: float
    seq: Annotated[int, Field(ge=0)] | None = None
    failsafe: bool
    failsafe_reason: str | None = None
    lease_left_s: Annotated[float, Field(ge=0)] | None = None
    refused: Refusal | None = None
    # Leases refused since the agent started because they failed authentication.
    auth_refused: Annotated[int, Field(ge=0)] | None = None
    power_w: list[float | None]
    power_avg_w: list[float | None]
    limit_w: list[float | None]
    min_w: list[float | None]
    max_w: list[float | None]
    q: list[Quality]

    @model_validator(mode="after")
    def _same_length(self) -> Telemetry:
        n = len(self.q)
        arrays = (self.power_w, self.power_avg_w, self.limit_w, self.min_w, self.max_w)
        if n > MAX_GPUS or any(len(a) != n for a in arrays):
            raise ValueError(f"per-GPU arrays must all have the same length (q has {n})")
        return self

    @property
    def gpu_count(self) -> int:
        return len(self.q)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def round_w(value: float | None) -> float | None:
    """Telemetry value for the wire: None for unknown or non-finite (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, ROUND_W)


def _problem(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = list(err["loc"])
        msg = err["msg"]
        if loc and loc[-1] == "[key]":
            loc.pop()
            msg = "a GPU must be named by its index (0-255) or its site id <node>-g<k>"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        where = format_loc(loc) or "message"
        parts.append(f"{where}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def decode_lease(payload: bytes | str) -> Lease:
    """Parse and validate a lease; MessageError with the field and reason otherwise."""
    try:
        return Lease.model_validate_json(payload)
    except ValidationError as exc:
        raise MessageError(f"invalid lease: {_problem(exc)}") from None


def decode_telemetry(payload: bytes | str) -> Telemetry:
    try:
        return Telemetry.model_validate_json(payload)
    except ValidationError as exc:
        raise MessageError(f"invalid telemetry: {_problem(exc)}") from None


# ---------------------------------------------------------------------------
# Checking a lease against the node


class LeaseRefused(Exception):
    """The whole lease is turned down (nothing of it applied); ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class LimitRange:
    """NVML's ``[min_w, max_w]`` power-limit range of one GPU."""

    min_w: float
    max_w: float


def resolve_caps(
    lease: Lease, node_id: str, ranges: Sequence[LimitRange | None]
) -> dict[int, float]:
    """The lease's caps by GPU index, or LeaseRefused if any cap is unusable.

    All or nothing: a cap outside its GPU's range, a GPU the node does not have, a site
    GPU id of another node or a GPU named twice refuses the whole lease, since applying
    part of a budget the controller computed as a whole could overdraw a level above.
    A GPU whose range is unknown (``None``: it was lost before its range could be read)
    cannot be checked or capped; its entry is skipped, not refused, so one dead GPU does
    not stop the others being capped.
    """
    caps: dict[int, float] = {}
    seen: set[int] = set()
    problems: list[str] = []
    for key, cap_w in lease.caps_w.items():
        m = GPU_KEY_RE.match(key)
        if m is None:  # pragma: no cover - the model's pattern already checked it
            problems.append(f"{key!r} is not a GPU index or site GPU id")
            continue
        if m["index"] is not None:
            index = int(m["index"])
        elif m["node"] == node_id:
            index = int(m["k"])
        else:
            problems.append(f"GPU {key} is not on this node ({node_id})")
            continue
        if not 0 <= index < len(ranges):
            problems.append(f"GPU {key}: this node has {len(ranges)} GPUs (0-{len(ranges) - 1})")
            continue
        if index in seen:
            problems.append(f"GPU {index} is named twice")
            continue
        seen.add(index)
        limits = ranges[index]
        if limits is not None and not limits.min_w <= cap_w <= limits.max_w:
            problems.append(
                f"GPU {index}: cap {cap_w:g} W outside its NVML range "
                f"[{limits.min_w:g}, {limits.max_w:g}] W"
            )
            continue
        if limits is not None:
            caps[index] = cap_w
    if problems:
        raise LeaseRefused("; ".join(problems))
    return caps


class LeaseSequence:
    """Sequence numbers for one controller that keep rising across its restarts.

    The agent applies only a lease whose ``seq`` is greater than the last it applied, so
    a controller that restarted and counted from 0 again would be ignored until it caught
    up. Starting from the wall clock in milliseconds and then counting by one keeps the
    sequence increasing across restarts, unless the wall clock was stepped back by more
    than the downtime (then agents stay in failsafe until it catches up: safe, and said
    in their telemetry as ignored leases in the controller's log).

    Agents refuse a seq more than their ``seq_window_s`` (default 10 min) away from their
    own wall clock in ms, either way: so the sequence must stay near the wall clock,
    which it does while the controller sends fewer than 1,000 leases a second.
    """

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._last = -1

    def next(self) -> int:
        self._last = max(self._last + 1, int(self._wall_clock() * 1000))
        return self._last
