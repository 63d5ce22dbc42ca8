"""The cap-sum guarantee: under every node the caps that could be enforced fit its budget.

A static cap is safe because a GPU cannot draw past its limit: if the limits under a
breaker, plus what no limit reaches, sum to its envelope, no demand can overdraw it.
rackpower keeps that guarantee and only moves the limits around inside it, so it is
safe for the same reason static is, whatever the demand does and however slowly a cap
lands (in band in a fraction of a second, through a BMC in tens of seconds).

The budget of node n in GPU watts is::

    (envelope - losses x baselines - unexplained - reservations - margin) / loss ratio

where the margin covers only what no cap reaches (unexplained load that rises: fans,
kit plugged in unmetered), learned from how fast that part has risen.

"Could be enforced" is the point of this module. A lowered limit is only a request
until the GPU reports it enforced; until then the old, higher limit may still hold. So
each GPU carries an *exposure*: the highest of its last reported enforced limit and
every limit sent since that report confirmed the latest one. Lowers go out at once
(they only shrink what may be drawn); a raise is granted only out of room that the
exposures leave under every node above the GPU. The power a raise uses therefore
comes from lowers that have been confirmed, never from ones still on their way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .index import TreeIndex
from .types import FloatArray

BoolArray = npt.NDArray[np.bool_]

CONFIRM_W = 1.0  # an enforced limit within this of the command confirms it (whole watts)
TOLERANCE_W = 1e-6
EARLIER = 4  # limits remembered per GPU between two confirmations, beyond the last
SUPERSEDE_S = 120.0  # longer than any actuation path lands or drops a limit (BMC: 10-40 s)


@dataclass(frozen=True, eq=False)
class ExposureMemory:
    """Per GPU: the last confirmed limit, what was sent since, and the last report."""

    confirmed_w: FloatArray  # last limit a report confirmed (the maximum before any)
    sent_max_w: FloatArray  # highest limit sent since that confirmation (-inf: none)
    last_report_w: FloatArray  # last enforced limit reported, NaN before any
    changed_s: FloatArray  # when the limit sent last changed
    earlier_w: FloatArray  # (GPUs, EARLIER) limits sent since it, before the last; NaN
    overflow: BoolArray  # more were sent since it than ``earlier_w`` holds

    @classmethod
    def unknown(cls, max_w: FloatArray) -> ExposureMemory:
        """Before any report: a GPU may be at any limit up to its maximum."""
        n = max_w.size
        return cls(
            confirmed_w=max_w.copy(),
            sent_max_w=np.full(n, -np.inf),
            last_report_w=np.full(n, np.nan),
            changed_s=np.full(n, -np.inf),
            earlier_w=np.full((n, EARLIER), np.nan),
            overflow=np.zeros(n, dtype=bool),
        )


@dataclass(frozen=True, eq=False)
class Exposure:
    """This cycle's view: what may be enforced now, and which reports confirmed."""

    exposure_w: FloatArray
    confirmed: BoolArray
    report_w: FloatArray


def exposure_now(
    memory: ExposureMemory, enforced_w: FloatArray, commanded_w: FloatArray, now_s: float
) -> Exposure:
    """What may be enforced before this cycle's commands go out.

    ``commanded_w`` is the last limit sent to each GPU. A report equal to it confirms
    it and everything sent before (an agent applies its limits in order, or only the
    newest): the exposure is that limit. Anything else means a limit is in flight, and
    the GPU may be at its last confirmed limit, at its report or at anything sent since:
    the exposure is the highest of them. One case is ambiguous: a higher limit sent and
    then, before it was confirmed, a lower one equal to a limit that was in force before
    (the confirmed one, or one sent in between); a report of that value may come from
    before the higher one landed. Such a report confirms only once the last change is
    ``SUPERSEDE_S`` old, by when the higher limit has landed or been dropped on any
    actuation path we support. A report of a value no earlier limit had can only come
    from the latest one, so it confirms at once. A GPU with no report keeps what it had.
    """
    known = np.isfinite(enforced_w)
    report = np.where(known, enforced_w, memory.last_report_w)
    matches = known & (np.abs(enforced_w - commanded_w) <= CONFIRM_W)
    plain = memory.sent_max_w <= commanded_w + CONFIRM_W
    seen_before = (
        (np.abs(memory.confirmed_w - commanded_w) <= CONFIRM_W)
        | (np.abs(memory.earlier_w - commanded_w[:, None]) <= CONFIRM_W).any(axis=1)
        | memory.overflow
    )
    settled = now_s - memory.changed_s >= SUPERSEDE_S
    confirmed = matches & (plain | ~seen_before | settled)
    pending = np.fmax(np.fmax(memory.confirmed_w, memory.sent_max_w), report)
    out: FloatArray = np.where(confirmed, commanded_w, pending)
    return Exposure(exposure_w=out, confirmed=confirmed, report_w=report)


def after_commands(
    memory: ExposureMemory,
    seen: Exposure,
    commanded_w: FloatArray,
    sent_w: FloatArray,
    now_s: float,
) -> ExposureMemory:
    """The memory to carry to the next cycle once ``sent_w`` has gone out.

    ``commanded_w`` is what was sent before this cycle (what ``seen`` was judged on).
    """
    changed = ~(np.abs(sent_w - commanded_w) < 0.5)
    confirmed_w = np.where(seen.confirmed, commanded_w, memory.confirmed_w)
    sent_max = np.where(seen.confirmed, -np.inf, memory.sent_max_w)
    sent_max = np.where(changed, np.maximum(sent_max, sent_w), sent_max)
    earlier = np.where(seen.confirmed[:, None], np.nan, memory.earlier_w)
    overflow = memory.overflow & ~seen.confirmed
    if changed.any():
        # The limit sent before this one becomes an earlier one (unless it is the
        # confirmed limit, which is checked on its own).
        shifted = np.concatenate((commanded_w[:, None], earlier[:, :-1]), axis=1)
        push = changed & ~seen.confirmed
        overflow = overflow | (push & np.isfinite(earlier[:, -1]))
        earlier = np.where(push[:, None], shifted, earlier)
    return ExposureMemory(
        confirmed_w=confirmed_w,
        sent_max_w=sent_max,
        last_report_w=seen.report_w,
        changed_s=np.where(changed, now_s, memory.changed_s),
        earlier_w=earlier,
        overflow=overflow,
    )


def per_gpu_min(index: TreeIndex, node_values: FloatArray) -> FloatArray:
    """Per GPU: the smallest value of any constraint node above it (+inf under none)."""
    out = np.full(index.n_gpus, np.inf)
    for level in index.levels:
        seg = level.seg_of_gpu
        vals = np.where(seg >= 0, node_values[level.nodes][np.maximum(seg, 0)], np.inf)
        out = np.minimum(out, vals)
    return out


def fit_lowers(
    index: TreeIndex, new_w: FloatArray, desired_w: FloatArray, budget_w: FloatArray
) -> FloatArray:
    """Where skipped small lowers left a node's caps over its budget, lower to ``desired``.

    ``desired`` fits every budget, so taking it everywhere under an over-budget node
    (and keeping ``new`` elsewhere, which is only ever lower) fits them all.
    """
    over = index.seg_sum(new_w) > budget_w + TOLERANCE_W
    if not over.any():
        return new_w
    under_over = per_gpu_min(index, np.where(over, 0.0, 1.0)) < 0.5
    out: FloatArray = np.where(under_over, np.minimum(new_w, desired_w), new_w)
    return out


def gate_raises(
    index: TreeIndex,
    lowered_w: FloatArray,
    desired_w: FloatArray,
    exposure_w: FloatArray,
    budget_w: FloatArray,
    blocked: BoolArray,
) -> tuple[FloatArray, BoolArray]:
    """Grant each wanted raise as far as the exposures leave room under every node.

    ``lowered_w`` are this cycle's limits with lowers applied and raises not yet;
    ``desired_w`` what the allocation wants. Up to its exposure a GPU rises for free
    (that limit may be in force already); beyond it, the extra is granted in the same
    proportion to every GPU under a node, the proportion its room allows, and the
    tightest node above a GPU decides. Returns the limits and, per node, whether a raise
    under it is waiting for room (lowers not yet confirmed).
    """
    wants = (desired_w > lowered_w) & ~blocked
    held = np.maximum(exposure_w, lowered_w)
    room = budget_w - index.seg_sum(held)
    # Up to its exposure a raise adds nothing to what may be enforced, but only where
    # the exposures fit: where they do not (limits unconfirmed, or an envelope that just
    # fell) a GPU's real limit may be well below its exposure, and any raise could be
    # the one that takes the real sum over.
    fits = per_gpu_min(index, np.where(room >= -TOLERANCE_W, 1.0, 0.0)) > 0.5
    stalled = index.seg_sum(np.where(wants & ~fits, 1.0, 0.0)) > 0
    wants &= fits
    free_to = np.where(wants, np.minimum(desired_w, held), lowered_w)
    extra = np.where(wants, np.maximum(desired_w - held, 0.0), 0.0)
    if not (extra > 0).any():
        return np.maximum(free_to, lowered_w), stalled
    asked = index.seg_sum(extra)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(asked > 0, np.clip(room / np.where(asked > 0, asked, 1.0), 0.0, 1.0), 1.0)
    factor = np.minimum(per_gpu_min(index, share), 1.0)
    granted = np.floor(extra * factor)
    out: FloatArray = np.where(extra > 0, held + granted, free_to)
    waiting = ((asked > 0) & (share < 1.0)) | stalled
    return out, waiting
