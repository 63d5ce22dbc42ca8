"""Power a scheduler has claimed for a job it is about to start: held, then expiring by itself.

Pure (time comes in as ``now_s``, ``time.time()`` seconds, because clients see the
expiry), so the API, the control cycle and tests share one store without locks: they all
run on one event loop.

A reservation on a rack is power the rack's row, bus, SST and feed must also find, so
it is granted only when every node from the one named up to the root has the headroom,
and it is counted in all of their ``reserved_w``. The policy takes reservations per node
where they were placed (:meth:`ReservationStore.own_w`) and sums them up itself.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from controller.model.topology import PowerTree

MAX_TTL_S = 24 * 3600.0
"""A reservation is a promise for a job about to start, not a standing allocation."""


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    node: str
    power_w: float
    job_id: str
    created_at_s: float
    expires_at_s: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was not granted: the node along the chain that lacks the power."""

    node: str
    requested_w: float
    limiting_node: str
    available_w: float

    @property
    def reason(self) -> str:
        where = "" if self.limiting_node == self.node else f" (limited by {self.limiting_node!r})"
        return (
            f"not enough headroom under {self.node!r}{where}: requested"
            f" {self.requested_w:g} W, available {max(self.available_w, 0.0):g} W"
        )


def _new_id() -> str:
    return "r-" + secrets.token_hex(6)


class ReservationStore:
    """Reservations by id, with expiry on read."""

    def __init__(
        self, *, max_ttl_s: float = MAX_TTL_S, new_id: Callable[[], str] = _new_id
    ) -> None:
        self.max_ttl_s = max_ttl_s
        self._new_id = new_id
        self._by_id: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def expire(self, now_s: float) -> tuple[Reservation, ...]:
        """Drop what has run out (an expiry at exactly ``now_s`` has run out); return it."""
        gone = tuple(r for r in self._by_id.values() if r.expires_at_s <= now_s)
        for r in gone:
            del self._by_id[r.id]
        return gone

    def active(self, now_s: float) -> tuple[Reservation, ...]:
        """Everything still held, oldest first."""
        self.expire(now_s)
        return tuple(self._by_id.values())

    def get(self, reservation_id: str, now_s: float) -> Reservation | None:
        self.expire(now_s)
        return self._by_id.get(reservation_id)

    def delete(self, reservation_id: str, now_s: float) -> Reservation | None:
        """Release a reservation early (the job started, or will not); None if unknown."""
        self.expire(now_s)
        return self._by_id.pop(reservation_id, None)

    def own_w(self, now_s: float) -> dict[str, float]:
        """Watts reserved per node where they were placed (``Snapshot.reservations_w``)."""
        out: dict[str, float] = {}
        for r in self.active(now_s):
            out[r.node] = out.get(r.node, 0.0) + r.power_w
        return out

    def reserved_w(self, tree: PowerTree, now_s: float) -> dict[str, float]:
        """Watts reserved per node, counting reservations on the node and everything below.

        Reservations on nodes the tree no longer has (after a reload) count nowhere.
        """
        out: dict[str, float] = {}
        for nid, watts in self.own_w(now_s).items():
            if nid not in tree:
                continue
            for holder in (nid, *tree.ancestors(nid)):
                out[holder] = out.get(holder, 0.0) + watts
        return out

    def available_w(
        self, tree: PowerTree, node: str, free_w: Mapping[str, float], now_s: float
    ) -> tuple[float, str]:
        """Least headroom from ``node`` up to the root, and the node where it is least.

        ``free_w`` is ``envelope - load`` per node before reservations; nodes absent
        from it are not constrained (a GPU server without an envelope of its own).
        """
        reserved = self.reserved_w(tree, now_s)
        best = math.inf
        where = node
        for holder in (node, *tree.ancestors(node)):
            if holder not in free_w:
                continue
            room = free_w[holder] - reserved.get(holder, 0.0)
            if room < best:
                best, where = room, holder
        return best, where

    def add(
        self,
        tree: PowerTree,
        *,
        node: str,
        power_w: float,
        ttl_s: float,
        job_id: str,
        now_s: float,
        free_w: Mapping[str, float],
    ) -> Reservation | Refusal:
        """Reserve ``power_w`` under ``node`` for ``ttl_s`` if every level above has it.

        ``KeyError`` for a node not in the tree and ``ValueError`` for numbers that make
        no sense: the API has checked both, so reaching them here is a caller's bug.
        """
        if node not in tree:
            raise KeyError(f"no node {node!r}")
        if not (math.isfinite(power_w) and power_w > 0):
            raise ValueError(f"power_w must be a positive number of watts, got {power_w!r}")
        if not (math.isfinite(ttl_s) and 0 < ttl_s <= self.max_ttl_s):
            raise ValueError(f"ttl_s must be in (0, {self.max_ttl_s:g}] s, got {ttl_s!r}")
        room, where = self.available_w(tree, node, free_w, now_s)
        if power_w > room:
            return Refusal(node=node, requested_w=power_w, limiting_node=where, available_w=room)
        rid = self._new_id()
        while rid in self._by_id:
            rid = self._new_id()
        res = Reservation(
            id=rid,
            node=node,
            power_w=power_w,
            job_id=job_id,
            created_at_s=now_s,
            expires_at_s=now_s + ttl_s,
        )
        self._by_id[rid] = res
        return res
