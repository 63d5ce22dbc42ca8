"""Helpers for the policy tests (no tests here): small trees and a toy plant.

The toy plant is deliberately simple (a GPU draws min(demand, limit) at once, meters read
the exact sum plus an optional loss): the policy tests check the control law, the real
plant model has its own tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import Action, Job, Policy, PolicyState, SetCap, Snapshot, decide
from tests.sites import tiny_site

FloatArray = np.ndarray


def site_dict(
    rack_envelope_w: float = 3800.0, row_envelope_w: float = 15000.0, meters: bool = True
) -> dict[str, Any]:
    """The tiny site (2 racks x 2 servers x 4 GPUs of 100-500 W, 200 W baseline per server)."""
    site = tiny_site()
    rack = site["rows"][0]["racks"][0]
    rack["rating_w"] = max(rack_envelope_w * 1.1, 1000.0)
    rack["envelope_w"] = rack_envelope_w
    rack["trip_curve"] = "c"
    row = site["rows"][0]
    row["envelope_w"] = row_envelope_w
    if not meters:
        site["feeds"][0]["meters"] = []
        rack["meters"] = []
    # Only three-band reads bands (rackpower has none): its tests are written for these.
    site.setdefault("policy", {})["bands"] = {
        "cap_above": 0.97,
        "target": 0.94,
        "uncap_below": 0.90,
    }
    return site


@cache
def tree_for(
    rack_envelope_w: float = 3800.0, row_envelope_w: float = 15000.0, meters: bool = True
) -> PowerTree:
    return PowerTree(parse_site(site_dict(rack_envelope_w, row_envelope_w, meters)))


def meter_readings(tree: PowerTree, power_w: FloatArray, loss: float = 1.0) -> dict[str, float]:
    """What each metered constraint node reads: GPUs plus baselines, times ``loss``."""
    out: dict[str, float] = {}
    for nid in tree.constraint_nodes():
        node = tree.node(nid)
        if not node.meters:
            continue
        first, stop = tree.gpu_range(nid)
        base = sum(
            tree.node(s).baseline_w for s in tree.subtree(nid) if tree.node(s).kind == "node"
        )
        out[nid] = loss * (float(np.sum(power_w[first:stop])) + base)
    return out


@dataclass
class Run:
    """A closed loop of policy and toy plant; records every cycle."""

    tree: PowerTree
    jobs: tuple[Job, ...] = ()
    policy: Policy = decide
    dt_s: float = 0.5
    loss: float = 1.0
    state: PolicyState | None = None
    limit_w: FloatArray = field(default_factory=lambda: np.zeros(0))
    now_s: float = 0.0
    actions: list[list[Action]] = field(default_factory=list)
    limits: list[FloatArray] = field(default_factory=list)
    powers: list[FloatArray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit_w.size == 0:
            self.limit_w = np.array([g.max_w for g in self.tree.gpus])

    def step(
        self,
        demand_w: FloatArray,
        stale_gpus: Sequence[int] = (),
        node_power_w: dict[str, float | None] | None = None,
        **snapshot_fields: Any,
    ) -> list[Action]:
        power = np.minimum(demand_w, self.limit_w)
        meters: dict[str, float | None] = dict(meter_readings(self.tree, power, self.loss))
        meters.update(node_power_w or {})
        seen = power.copy()
        seen[list(stale_gpus)] = np.nan
        snap = Snapshot.build(
            self.tree,
            self.now_s,
            gpu_power_w=seen,
            gpu_limit_w=self.limit_w,
            jobs=self.jobs,
            node_power_w=meters,
            **snapshot_fields,
        )
        actions, self.state = self.policy(snap, self.tree, self.state)
        self.limit_w = np.array(self.state.target_w)
        self.now_s += self.dt_s
        self.actions.append(list(actions))
        self.limits.append(self.limit_w.copy())
        self.powers.append(power)
        return list(actions)

    def repeat(self, n: int, demand: Callable[[int], FloatArray], **kw: Any) -> None:
        for i in range(n):
            self.step(demand(i), **kw)

    def cap_changes(self, since: int = 0) -> int:
        """GPU-limit changes (one per GPU whose limit moved) from cycle ``since`` on."""
        return sum(
            len(a.gpus) for acts in self.actions[since:] for a in acts if isinstance(a, SetCap)
        )


def rack_load_w(tree: PowerTree, rack: str, power_w: FloatArray) -> float:
    return meter_readings(tree, power_w)[rack]
