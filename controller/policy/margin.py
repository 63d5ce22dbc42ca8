"""Safety margin learned from the worst rise of each node's load within one actuation latency.

A cap takes an actuation latency to bite, so the headroom a node needs is whatever its
load can rise in that time; a fixed percentage is either too tight for synchronized
training or wasteful for quiet inference. The margin is the worst such rise seen over
``window_s``, bounded to [min_fraction, max_fraction] of the envelope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import Margin

from .types import FloatArray
from .window import WindowMax

HISTORY = 16  # recent samples kept to find the load one actuation latency ago
BUCKETS = 10


@dataclass(frozen=True, eq=False)
class MarginMemory:
    times_s: FloatArray  # newest first, NaN where empty
    loads_w: FloatArray  # (HISTORY, nodes)
    worst_rise: WindowMax

    @classmethod
    def empty(cls, n_nodes: int, cfg: Margin) -> MarginMemory:
        return cls(
            times_s=np.full(HISTORY, np.nan),
            loads_w=np.full((HISTORY, n_nodes), np.nan),
            worst_rise=WindowMax.empty(n_nodes, cfg.window_s, BUCKETS),
        )


def update_margin(
    memory: MarginMemory,
    now_s: float,
    load_w: FloatArray,
    learn: npt.NDArray[np.bool_],
    envelope_w: FloatArray,
    cfg: Margin,
) -> tuple[FloatArray, MarginMemory]:
    """The margin per node and the memory with this sample added.

    ``learn`` masks out nodes whose estimate this cycle rests on stale data: a meter that
    goes silent jumps to its rating, which is not a rise the load can make.
    """
    times = memory.times_s
    valid = np.isfinite(times) & (times < now_s)
    rise = np.zeros_like(load_w)
    if valid.any():
        newest = float(np.nanmax(np.where(valid, times, np.nan)))
        # With a cycle longer than the latency, the previous sample is the best we have.
        horizon = min(now_s - cfg.actuation_latency_s, newest)
        use = valid & (times >= horizon)
        lowest = np.nanmin(memory.loads_w[use], axis=0)
        rise = np.where(learn & np.isfinite(lowest), np.maximum(load_w - lowest, 0.0), 0.0)
    worst = memory.worst_rise.push(now_s, rise)
    margin = np.clip(worst.maximum(), cfg.min_fraction * envelope_w, cfg.max_fraction * envelope_w)
    new = MarginMemory(
        times_s=np.concatenate(([now_s], times[:-1])),
        loads_w=np.concatenate((load_w[None, :], memory.loads_w[:-1])),
        worst_rise=worst,
    )
    return margin, new
