"""Array views of a power tree, built once per tree so ``decide`` only does array math.

The control cycle has a few milliseconds for a thousand GPUs; walking NodeDefs and
dicts per cycle would eat that. Everything that depends only on the tree (and its
policy config) is precomputed here and cached on the tree object.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import TripCurve
from controller.model.topology import CONSTRAINT_KINDS, PowerTree

from .types import FloatArray

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class KindLevel:
    """The constraint nodes of one kind: disjoint subtrees, so one GPU is in at most one."""

    kind: str
    nodes: IntArray  # indices into TreeIndex.node_ids
    seg_of_gpu: IntArray  # per GPU: position in ``nodes`` of its node, or -1


@dataclass(frozen=True, eq=False)
class TreeIndex:
    """Constraint nodes (in tree order, parents first) and GPUs as flat arrays."""

    tree: PowerTree
    node_ids: tuple[str, ...]
    pos: dict[str, int]
    kind: tuple[str, ...]
    parent: IntArray  # nearest constraint ancestor, -1 at a root
    start: IntArray  # GPU range [start, stop) under each node
    stop: IntArray
    base_w: FloatArray  # baseline (non-cappable) of the GPU servers under each node
    rating_w: FloatArray
    envelope_w: FloatArray
    metered: npt.NDArray[np.bool_]  # the config gives the node (or its sources) meters
    curves: tuple[TripCurve | None, ...]
    has_sources: npt.NDArray[np.bool_]
    levels: tuple[KindLevel, ...]  # bottom-up: rack, row, bus, sst, feed
    # GPUs
    gpu_floor_w: FloatArray
    gpu_max_w: FloatArray
    gpu_server: IntArray
    # GPU servers (tree kind "node"), in tree order
    server_ids: tuple[str, ...]
    server_pos: dict[str, int]
    server_start: IntArray
    server_base_w: FloatArray
    server_owner: IntArray  # nearest constraint ancestor of each server
    racks: IntArray  # constraint nodes of kind rack (migration targets)

    @property
    def n_gpus(self) -> int:
        return len(self.gpu_max_w)

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    def seg_sum(self, per_gpu: FloatArray) -> FloatArray:
        """Sum of a per-GPU quantity under every constraint node (contiguous ranges)."""
        cs = np.concatenate(([0.0], np.cumsum(per_gpu)))
        out: FloatArray = cs[self.stop] - cs[self.start]
        return out

    def effective_rating_w(self, lost_sources: frozenset[str]) -> FloatArray:
        """Rating with lost feed sources removed (what the surviving breakers carry)."""
        if not lost_sources or not self.has_sources.any():
            return self.rating_w
        out = self.rating_w.copy()
        for k in np.flatnonzero(self.has_sources):
            node = self.tree.node(self.node_ids[k])
            alive = [s.rating_w for s in node.sources if s.id not in lost_sources]
            out[k] = min(out[k], sum(alive))
        return out

    def curve_of(self, k: int, lost_sources: frozenset[str]) -> TripCurve | None:
        """The node's own curve, else the curve of its first surviving feed source."""
        if self.curves[k] is not None or not self.has_sources[k]:
            return self.curves[k]
        for src in self.tree.node(self.node_ids[k]).sources:
            if src.id not in lost_sources and src.trip_curve is not None:
                curve = src.trip_curve
                if isinstance(curve, TripCurve):
                    return curve
                return self.tree.site.spec.trip_curves.get(curve)
        return None


_CACHE: weakref.WeakKeyDictionary[PowerTree, TreeIndex] = weakref.WeakKeyDictionary()


def tree_index(tree: PowerTree) -> TreeIndex:
    """The index of ``tree``, built on first use and cached while the tree lives."""
    idx = _CACHE.get(tree)
    if idx is None:
        idx = _build(tree)
        _CACHE[tree] = idx
    return idx


def _build(tree: PowerTree) -> TreeIndex:
    cons = tree.constraint_nodes()
    pos = {nid: k for k, nid in enumerate(cons)}
    n = len(cons)
    parent = np.full(n, -1, dtype=np.intp)
    for k, nid in enumerate(cons):
        for anc in tree.ancestors(nid):
            if anc in pos:
                parent[k] = pos[anc]
                break
    ranges = [tree.gpu_range(nid) for nid in cons]
    start = np.array([r[0] for r in ranges], dtype=np.intp).reshape(n)
    stop = np.array([r[1] for r in ranges], dtype=np.intp).reshape(n)
    defs = [tree.node(nid) for nid in cons]
    base_by_node = tree.aggregate({nid: tree.node(nid).baseline_w for nid in tree.of_kind("node")})

    n_gpus = len(tree.gpus)
    levels: list[KindLevel] = []
    for kind in reversed(CONSTRAINT_KINDS):
        members = np.array([k for k in range(n) if defs[k].kind == kind], dtype=np.intp)
        if members.size == 0:
            continue
        seg = np.full(n_gpus, -1, dtype=np.intp)
        for j, k in enumerate(members):
            seg[start[k] : stop[k]] = j
        levels.append(KindLevel(kind=kind, nodes=members, seg_of_gpu=seg))

    servers = tree.of_kind("node")
    server_pos = {sid: s for s, sid in enumerate(servers)}
    gpu_server = np.array([server_pos[g.node] for g in tree.gpus], dtype=np.intp).reshape(n_gpus)
    server_start = np.array([tree.gpu_range(s)[0] for s in servers], dtype=np.intp).reshape(
        len(servers)
    )
    owner = np.full(len(servers), -1, dtype=np.intp)
    for s, sid in enumerate(servers):
        for anc in tree.ancestors(sid):
            if anc in pos:
                owner[s] = pos[anc]
                break

    return TreeIndex(
        tree=tree,
        node_ids=cons,
        pos=pos,
        kind=tuple(d.kind for d in defs),
        parent=parent,
        start=start,
        stop=stop,
        base_w=np.array([base_by_node[nid] for nid in cons], dtype=np.float64).reshape(n),
        rating_w=np.array([d.rating_w for d in defs], dtype=np.float64).reshape(n),
        envelope_w=np.array([d.envelope_w for d in defs], dtype=np.float64).reshape(n),
        metered=np.array(
            [bool(d.meters) or any(s.meters for s in d.sources) for d in defs], dtype=bool
        ).reshape(n),
        curves=tuple(d.trip_curve for d in defs),
        has_sources=np.array([bool(d.sources) for d in defs], dtype=bool).reshape(n),
        levels=tuple(levels),
        gpu_floor_w=np.array([g.floor_w for g in tree.gpus], dtype=np.float64).reshape(n_gpus),
        gpu_max_w=np.array([g.max_w for g in tree.gpus], dtype=np.float64).reshape(n_gpus),
        gpu_server=gpu_server,
        server_ids=servers,
        server_pos=server_pos,
        server_start=server_start,
        server_base_w=np.array(
            [tree.node(s).baseline_w for s in servers], dtype=np.float64
        ).reshape(len(servers)),
        server_owner=owner,
        racks=np.array([k for k in range(n) if defs[k].kind == "rack"], dtype=np.intp),
    )


def covered(index: TreeIndex, node_mask: BoolArray) -> BoolArray:
    """Per GPU: is it under any node in ``node_mask``?"""
    if not node_mask.any():
        return np.zeros(index.n_gpus, dtype=bool)
    size = index.n_gpus + 1
    marks = np.bincount(index.start[node_mask], minlength=size) - np.bincount(
        index.stop[node_mask], minlength=size
    )
    out: BoolArray = np.cumsum(marks[:-1]) > 0
    return out
