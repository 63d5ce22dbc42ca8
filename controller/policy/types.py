"""What goes into a policy and what comes out of it.

Everything here is a frozen value: the policy is a pure function of (snapshot, tree,
state), so the caller can replay a recorded run, and a scenario can run several policies
on the same snapshots without one disturbing another. NumPy arrays inside frozen values
are made read-only for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from controller.model.topology import PowerTree

FloatArray = npt.NDArray[np.float64]


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def frozen_array(values: Any, size: int | None = None, fill: float = np.nan) -> FloatArray:
    """A read-only float64 copy (``fill`` of ``size`` when ``values`` is None)."""
    if values is None:
        if size is None:
            raise ValueError("frozen_array needs values or a size")
        out = np.full(size, fill, dtype=np.float64)
    else:
        out = np.array(values, dtype=np.float64, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Job:
    """A unit of GPU work as the scheduler sees it.

    ``gpus`` are indices into ``tree.gpus``. A synchronous job runs at the pace of its
    slowest GPU, so it gets one cap across all of them; an asynchronous one (inference
    replicas) may be capped GPU by GPU.
    """

    id: str
    priority_class: str
    gpus: tuple[int, ...]
    synchronous: bool = True
    migratable: bool = False


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Everything the policy may know about one moment, already reduced to numbers.

    ``node_power_w`` holds the measured power of constraint nodes: a float when the
    reading is usable, ``None`` when the node has meters but no usable reading (stale,
    bad, missing), which the policy treats as the node's rating. A node absent from the
    mapping is unmetered unless the config gives it meters (then absent means missing).
    GPU arrays are indexed like ``tree.gpus``; a NaN power is a GPU the policy cannot
    see and counts at its maximum; a NaN limit means "unknown" (the policy then assumes
    its own last command was applied). ``uncappable`` names GPU servers known not to
    obey their caps (a tenant raised the limits, or killed the agent at maximum): their
    GPUs are planned at their maximum and no cap of theirs is counted on, so the budget
    of the levels above goes to the servers that do obey.
    """

    now_s: float
    gpu_power_w: FloatArray
    gpu_limit_w: FloatArray
    node_power_w: Mapping[str, float | None] = field(default_factory=_empty)
    jobs: tuple[Job, ...] = ()
    reservations_w: Mapping[str, float] = field(default_factory=_empty)
    envelope_override_w: Mapping[str, float] = field(default_factory=_empty)
    lost_sources: frozenset[str] = frozenset()
    trip_used: Mapping[str, float] | None = None
    uncappable: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        tree: PowerTree,
        now_s: float,
        *,
        gpu_power_w: Any = None,
        gpu_limit_w: Any = None,
        node_power_w: Mapping[str, float | None] | None = None,
        jobs: tuple[Job, ...] | list[Job] = (),
        reservations_w: Mapping[str, float] | None = None,
        envelope_override_w: Mapping[str, float] | None = None,
        lost_sources: frozenset[str] | set[str] = frozenset(),
        trip_used: Mapping[str, float] | None = None,
        uncappable: frozenset[str] | set[str] = frozenset(),
    ) -> Snapshot:
        """Coerce whatever the caller has (lists, arrays, dicts) into a valid snapshot.

        Missing GPU arrays mean "unknown": power NaN (worst case), limit NaN.
        """
        size = len(tree.gpus)
        power = frozen_array(gpu_power_w, size)
        limit = frozen_array(gpu_limit_w, size)
        if power.shape != (size,) or limit.shape != (size,):
            raise ValueError(f"GPU arrays must have shape ({size},), one entry per tree GPU")
        return cls(
            now_s=float(now_s),
            gpu_power_w=power,
            gpu_limit_w=limit,
            node_power_w=MappingProxyType(dict(node_power_w or {})),
            jobs=tuple(jobs),
            reservations_w=MappingProxyType(dict(reservations_w or {})),
            envelope_override_w=MappingProxyType(dict(envelope_override_w or {})),
            lost_sources=frozenset(lost_sources),
            trip_used=None if trip_used is None else MappingProxyType(dict(trip_used)),
            uncappable=frozenset(uncappable),
        )


# ---------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class SetCap:
    """Set the power limit of a group of GPUs (a job, or a server's unassigned GPUs).

    ``node_id`` is the constraint node that decided it; ``reason`` is the audit line.
    Actuators clip ``limit_w`` to each GPU's NVML range.
    """

    job_id: str | None
    gpus: tuple[int, ...]
    limit_w: float
    reason: str
    node_id: str = ""
    # Whether the limit holds the group below what it is believed to want. Under the
    # cap-sum rule an oversubscribed rack always has limits below the GPUs' maxima, but a
    # job whose limit is above its demand is not slowed: tenants are told only when it is.
    limiting: bool = True


@dataclass(frozen=True)
class Migrate:
    """Ask the scheduler to move a job off ``node_id`` (caps at floor are not enough)."""

    job_id: str
    node_id: str
    reason: str


@dataclass(frozen=True)
class Requeue:
    """Ask the scheduler to stop a job and queue it again (nowhere to move it to)."""

    job_id: str
    node_id: str
    reason: str


Action = SetCap | Migrate | Requeue


# ---------------------------------------------------------------------------
# State


@dataclass(frozen=True, eq=False)
class NodeStatus:
    """Per constraint node, as the policy saw it on its last cycle (API, audit, BMS).

    Arrays are indexed like ``node_ids``; ``mode`` is ``cap`` (its GPUs' demand does not
    fit its budget: caps are shared out), ``release`` (raises under it wait for lowers to
    be confirmed) or ``hold`` (everything fits).
    """

    node_ids: tuple[str, ...] = ()
    load_w: FloatArray = field(default_factory=lambda: frozen_array(()))
    envelope_w: FloatArray = field(default_factory=lambda: frozen_array(()))
    headroom_w: FloatArray = field(default_factory=lambda: frozen_array(()))
    margin_w: FloatArray = field(default_factory=lambda: frozen_array(()))
    trip_used: FloatArray = field(default_factory=lambda: frozen_array(()))
    mode: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, dict[str, float | str]]:
        """``{node_id: {load_w, envelope_w, headroom_w, margin_w, trip_used, mode}}``."""
        return {
            nid: {
                "load_w": float(self.load_w[k]),
                "envelope_w": float(self.envelope_w[k]),
                "headroom_w": float(self.headroom_w[k]),
                "margin_w": float(self.margin_w[k]),
                "trip_used": float(self.trip_used[k]),
                "mode": self.mode[k] if self.mode else "",
            }
            for k, nid in enumerate(self.node_ids)
        }


@dataclass(frozen=True, eq=False)
class PolicyState:
    """What a policy carries from one cycle to the next.

    ``target_w`` is the full per-GPU limit vector the policy wants enforced (the
    actuator and the plant take a vector); ``nodes`` is the per-node view for the API.
    ``memory`` is private to the policy that produced the state (history, learned
    margins, ...); callers pass the state back untouched and never look inside.
    """

    tree_id: int
    now_s: float
    target_w: FloatArray
    nodes: NodeStatus = NodeStatus()
    memory: Any = None


class Policy(Protocol):
    """``decide(snapshot, tree, state) -> (actions, state)``; ``state`` None starts fresh."""

    def __call__(
        self, snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
    ) -> tuple[tuple[Action, ...], PolicyState]: ...
