"""The audit trail: every action the controller takes or refuses, with why and on what numbers.

A facility engineer asked "why was job X slowed at 03:12?" answers it from here: each
event carries the reason the policy gave and the readings it acted on. Three outlets,
because they serve different people: a ring buffer for ``GET /v1/events`` (the last few
thousand, in memory), a JSON-lines file (optional; appended and flushed per event, so it
survives a crash), and one log line per event for journald.

Writing the file must never stop the control cycle: a failed write is logged once,
counted, and the event still reaches the ring buffer and the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final, Literal, get_args

from controller.model.topology import PowerTree
from controller.policy.types import Action, Migrate, Requeue, SetCap

log = logging.getLogger("rackpower.audit")

# Event kinds. Actions of the policy, then what people and other systems asked for.
CAP: Final = "cap"
UNCAP: Final = "uncap"
MIGRATE: Final = "migrate"
REQUEUE: Final = "requeue"
REFUSAL: Final = "refusal"
COMMAND: Final = "command"
RESERVATION: Final = "reservation"
RELEASE: Final = "release"
EventKind = Literal[
    "cap", "uncap", "migrate", "requeue", "refusal", "command", "reservation", "release"
]
KINDS: Final[tuple[str, ...]] = get_args(EventKind)

Readings = Mapping[str, float | None]
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One line of the trail. ``seq`` rises by one per event since start (clients page by it).

    ``readings`` are the numbers the decision was made on (``"rack-1.power_w"``, ...);
    ``advisory`` marks what advisory mode would have done but did not.
    """

    seq: int
    ts_s: float
    kind: str
    reason: str
    node: str | None = None
    job_id: str | None = None
    readings: Readings = field(default_factory=lambda: _EMPTY)
    details: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    advisory: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts_s": self.ts_s,
            "kind": self.kind,
            "reason": self.reason,
            "node": self.node,
            "job_id": self.job_id,
            "readings": {k: _clean(v) for k, v in self.readings.items()},
            "details": {k: _clean(v) for k, v in self.details.items()},
            "advisory": self.advisory,
        }


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: an unknown reading is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def action_kind(action: Action, tree: PowerTree) -> str:
    """``cap`` when the limit holds any of the GPUs under its maximum, else ``uncap``."""
    if isinstance(action, Migrate):
        return MIGRATE
    if isinstance(action, Requeue):
        return REQUEUE
    if any(action.limit_w < tree.gpus[g].max_w for g in action.gpus):
        return CAP
    return UNCAP


class AuditLog:
    """Ring buffer + optional JSON-lines file + log line, one call per event."""

    def __init__(self, *, capacity: int = 5000, path: Path | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ring: deque[AuditEvent] = deque(maxlen=capacity)
        self._seq = 0
        self.path = path
        self._file: IO[str] | None = None
        self.write_errors = 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def record(
        self,
        kind: str,
        reason: str,
        *,
        now_s: float,
        node: str | None = None,
        job_id: str | None = None,
        readings: Readings | None = None,
        details: Mapping[str, Any] | None = None,
        advisory: bool = False,
    ) -> AuditEvent:
        self._seq += 1
        event = AuditEvent(
            seq=self._seq,
            ts_s=now_s,
            kind=kind,
            reason=reason,
            node=node,
            job_id=job_id,
            readings=MappingProxyType(dict(readings or {})),
            details=MappingProxyType(dict(details or {})),
            advisory=advisory,
        )
        self._ring.append(event)
        log.info(
            "%s%s node=%s job=%s: %s",
            "[advisory] " if advisory else "",
            kind,
            node or "-",
            job_id or "-",
            reason,
        )
        self._write(event)
        return event

    def record_action(
        self,
        action: Action,
        tree: PowerTree,
        *,
        now_s: float,
        readings: Readings | None = None,
        advisory: bool = False,
    ) -> AuditEvent:
        """Record a policy action with the reason it carries."""
        details: dict[str, Any] = {}
        if isinstance(action, SetCap):
            details = {"limit_w": action.limit_w, "gpus": len(action.gpus)}
            servers = sorted({tree.gpus[g].node for g in action.gpus})
            details["servers"] = servers if len(servers) <= 16 else [*servers[:16], "..."]
        return self.record(
            action_kind(action, tree),
            action.reason,
            now_s=now_s,
            node=action.node_id or None,
            job_id=action.job_id,
            readings=readings,
            details=details,
            advisory=advisory,
        )

    def recent(
        self, *, limit: int = 100, since_seq: int = 0, kinds: Sequence[str] = ()
    ) -> list[AuditEvent]:
        """The newest ``limit`` events after ``since_seq``, oldest first."""
        out = [e for e in self._ring if e.seq > since_seq and (not kinds or e.kind in kinds)]
        return out[-limit:] if limit > 0 else []

    def _write(self, event: AuditEvent) -> None:
        if self.path is None:
            return
        line = json.dumps(event.to_json(), separators=(",", ":"), allow_nan=False, default=str)
        try:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors == 1:
                log.error(
                    "audit file %s: cannot write (%s); keeping events in memory", self.path, exc
                )
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
