"""Turn a new cap vector into the few SetCap actions an operator can read.

One action per cap group (a job, or a server's unassigned GPUs) and limit, only where
the limit changed, each with a reason naming the constraint node and its numbers:
the audit trail prints these lines verbatim.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .index import IntArray, TreeIndex
from .jobs import JobIndex
from .types import FloatArray, SetCap

CHANGE_W = 0.5


def changed_mask(new_w: FloatArray, old_w: FloatArray) -> np.ndarray:
    """Where the limit differs; an unknown old limit (NaN) always counts as changed."""
    return ~(np.abs(new_w - old_w) < CHANGE_W)


def cap_actions(
    index: TreeIndex,
    jobs: JobIndex,
    new_w: FloatArray,
    old_w: FloatArray,
    node_of_gpu: IntArray,
    explain: Callable[[int, str, float, float], str],
    note_of_gpu: Callable[[int], str] | None = None,
    limiting_gpu: npt.NDArray[np.bool_] | None = None,
) -> list[SetCap]:
    """SetCap per (group, new limit) where the limit changed.

    ``explain(node, label, old_w, new_w)`` writes the reason; ``node_of_gpu`` is the
    constraint node that decided each GPU's cap; ``note_of_gpu`` (of a group's first GPU)
    adds to the group's label why it was planned as it was; ``limiting_gpu`` says which
    GPUs the new limit holds below their demand (default: all).
    """
    changed = np.flatnonzero(changed_mask(new_w, old_w))
    if changed.size == 0:
        return []
    groups = jobs.gpu_group[changed]
    limits = new_w[changed]
    order = np.lexsort((limits, groups))
    changed, groups, limits = changed[order], groups[order], limits[order]
    cut = np.flatnonzero((groups[1:] != groups[:-1]) | (limits[1:] != limits[:-1])) + 1
    out: list[SetCap] = []
    for run in np.split(np.arange(changed.size), cut):
        first = int(changed[run[0]])
        job_id, label = jobs.group_label(int(groups[run[0]]), index)
        if note_of_gpu is not None:
            label += note_of_gpu(first)
        node = int(node_of_gpu[first])
        old = float(old_w[first])
        limit = float(limits[run[0]])
        out.append(
            SetCap(
                job_id=job_id,
                gpus=tuple(int(g) for g in changed[run]),
                limit_w=limit,
                reason=explain(node, label, old, limit),
                node_id=index.node_ids[node] if node >= 0 else "",
                limiting=True if limiting_gpu is None else bool(limiting_gpu[changed[run]].any()),
            )
        )
    return out
