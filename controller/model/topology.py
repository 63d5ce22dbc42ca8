"""The power tree: an immutable view of a validated site that the policy and API walk.

Built once per config (and again on reload); everything is precomputed at build time
so that the hot path (the control cycle) only does dictionary and array lookups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from controller.model.config import LEVELS, FeedSource, Kind, NodeDef, Site

CONSTRAINT_KINDS: tuple[Kind, ...] = ("feed", "sst", "bus", "row", "rack")


@dataclass(frozen=True)
class GpuInfo:
    """A cappable GPU: NVML limit range and the floor the controller never goes below."""

    id: str
    node: str
    index: int
    min_w: float
    max_w: float
    default_w: float
    floor_w: float


class PowerTree:
    """Lookup by id, parent chains, subtrees, aggregation and the N-1 view of A/B feeds."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._nodes: dict[str, NodeDef] = {n.id: n for n in site.nodes}
        children: dict[str, list[str]] = {n.id: [] for n in site.nodes}
        roots: list[str] = []
        for n in site.nodes:
            if n.parent is None:
                roots.append(n.id)
            else:
                children[n.parent].append(n.id)
        self._children = {k: tuple(v) for k, v in children.items()}
        self.roots: tuple[str, ...] = tuple(roots)

        # Depth-first order: a parent comes before its children, so reversing it
        # aggregates bottom-up in one pass.
        order: list[str] = []
        stack = list(reversed(self.roots))
        while stack:
            nid = stack.pop()
            order.append(nid)
            stack.extend(reversed(self._children[nid]))
        self.order: tuple[str, ...] = tuple(order)

        self.gpus: tuple[GpuInfo, ...] = self._gpu_table()
        self.gpu_index: Mapping[str, int] = MappingProxyType({g.id: g.index for g in self.gpus})
        self._max_draw = self._aggregate_defs(self._own_max_w)
        self._floor_draw = self._aggregate_defs(self._own_floor_w)
        self._gpu_slices = self._subtree_gpu_indices()

    # -- construction helpers -------------------------------------------------

    def _gpu_table(self) -> tuple[GpuInfo, ...]:
        policy_floor = self.site.policy.gpu_floor_w or 0.0
        models = self.site.gpu_models
        out: list[GpuInfo] = []
        for nid in self.order:
            n = self._nodes[nid]
            if n.kind != "gpu":
                continue
            model = models[n.gpu_model or ""]
            floor = min(max(model.min_w, n.floor_w or 0.0, policy_floor), model.max_w)
            out.append(
                GpuInfo(
                    id=n.id,
                    node=n.parent or "",
                    index=len(out),
                    min_w=model.min_w,
                    max_w=model.max_w,
                    default_w=model.default_w or model.max_w,
                    floor_w=floor,
                )
            )
        return tuple(out)

    def _own_max_w(self, n: NodeDef) -> float:
        if n.kind == "gpu":
            return self.site.gpu_models[n.gpu_model or ""].max_w
        return n.baseline_w if n.kind == "node" else 0.0

    def _own_floor_w(self, n: NodeDef) -> float:
        if n.kind == "gpu":
            return self.gpus[self.gpu_index[n.id]].floor_w
        return n.baseline_w if n.kind == "node" else 0.0

    def _aggregate_defs(self, own: Callable[[NodeDef], float]) -> dict[str, float]:
        return self.aggregate({nid: own(self._nodes[nid]) for nid in self.order})

    def _subtree_gpu_indices(self) -> dict[str, tuple[int, int]]:
        # In depth-first order a subtree is one contiguous run of positions, and so are
        # its GPUs: [gpus before the node, gpus before the end of its subtree).
        position = {nid: p for p, nid in enumerate(self.order)}
        size = dict.fromkeys(self.order, 1)
        for nid in reversed(self.order):
            parent = self._nodes[nid].parent
            if parent is not None:
                size[parent] += size[nid]
        is_gpu = np.fromiter(
            (self._nodes[nid].kind == "gpu" for nid in self.order),
            dtype=bool,
            count=len(self.order),
        )
        before = np.concatenate(([0], np.cumsum(is_gpu))).tolist()
        return {
            nid: (before[position[nid]], before[position[nid] + size[nid]]) for nid in self.order
        }

    # -- lookups -----------------------------------------------------------------

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, node_id: str) -> NodeDef:
        """The node with this id; ``KeyError`` names it when it does not exist."""
        try:
            return self._nodes[node_id]
        except KeyError:
            raise KeyError(f"no node {node_id!r} in site {self.site.name!r}") from None

    def children(self, node_id: str) -> tuple[str, ...]:
        return self._children[node_id]

    def parent(self, node_id: str) -> str | None:
        return self.node(node_id).parent

    def ancestors(self, node_id: str) -> tuple[str, ...]:
        """Parent chain from the direct parent up to the root."""
        chain: list[str] = []
        p = self.node(node_id).parent
        while p is not None:
            chain.append(p)
            p = self._nodes[p].parent
        return tuple(chain)

    def subtree(self, node_id: str) -> Iterator[str]:
        """The node and everything below it, parents before children."""
        stack = [node_id]
        while stack:
            nid = stack.pop()
            yield nid
            stack.extend(reversed(self._children[nid]))

    def of_kind(self, kind: Kind) -> tuple[str, ...]:
        return tuple(nid for nid in self.order if self._nodes[nid].kind == kind)

    def constraint_nodes(self) -> tuple[str, ...]:
        """Every level with an envelope the controller enforces (feed down to rack)."""
        return tuple(nid for nid in self.order if self._nodes[nid].kind in CONSTRAINT_KINDS)

    def gpu_range(self, node_id: str) -> tuple[int, int]:
        """``(first, stop)`` into :attr:`gpus` of the GPUs under ``node_id`` (contiguous)."""
        return self._gpu_slices[node_id]

    def gpu_indices(self, node_id: str) -> npt.NDArray[np.intp]:
        """Indices into :attr:`gpus` of every GPU under ``node_id``."""
        first, stop = self._gpu_slices[node_id]
        return np.arange(first, stop, dtype=np.intp)

    def counts(self) -> dict[str, int]:
        """How many nodes of each kind, in tree order of the kinds."""
        out: dict[str, int] = dict.fromkeys(LEVELS, 0)
        for n in self._nodes.values():
            out[n.kind] += 1
        return out

    # -- aggregation ---------------------------------------------------------------

    def aggregate(self, own: Mapping[str, float]) -> dict[str, float]:
        """Sum a per-node quantity up the tree: each node gets its own value plus its subtree's."""
        total = {nid: float(own.get(nid, 0.0)) for nid in self.order}
        for nid in reversed(self.order):
            p = self._nodes[nid].parent
            if p is not None:
                total[p] += total[nid]
        return total

    def max_draw_w(self, node_id: str) -> float:
        """Most the subtree can draw: GPUs at max limit plus baselines (losses not included)."""
        return self._max_draw[node_id]

    def floor_draw_w(self, node_id: str) -> float:
        """Least the controller can bring the subtree to: GPUs at floor plus baselines."""
        return self._floor_draw[node_id]

    def oversubscription(self, node_id: str) -> float:
        """Sum of the children's maximum draw over this node's envelope (1.3 = 30 % over)."""
        return self._max_draw[node_id] / self.node(node_id).envelope_w

    def most_oversubscribed(self, limit: int = 5) -> list[tuple[str, float]]:
        ranked = sorted(
            ((nid, self.oversubscription(nid)) for nid in self.constraint_nodes()),
            key=lambda kv: (-kv[1], kv[0]),
        )
        return ranked[:limit]

    # -- redundancy ------------------------------------------------------------------

    def sources(self, node_id: str) -> tuple[FeedSource, ...]:
        return self.node(node_id).sources

    def effective_envelope_w(
        self, node_id: str, lost_sources: frozenset[str] = frozenset()
    ) -> float:
        """Envelope of a node with some feed sources lost (the N-1 view).

        A redundant feed's envelope shrinks to what its surviving sources can carry;
        with every source lost it is zero (everything below is dark).
        """
        n = self.node(node_id)
        if not n.sources:
            return n.envelope_w
        alive = [s for s in n.sources if s.id not in lost_sources]
        return min(n.envelope_w, sum(s.envelope_w for s in alive))

    def n_minus_1(self) -> dict[str, dict[str, float]]:
        """For every source that can be lost: the envelopes that change when it is."""
        out: dict[str, dict[str, float]] = {}
        for nid in self.of_kind("feed"):
            for src in self.sources(nid):
                out[src.id] = {nid: self.effective_envelope_w(nid, frozenset({src.id}))}
        return out
