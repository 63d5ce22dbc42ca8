"""The exact water level of a node against a plain bisection written out GPU by GPU.

``controller.policy.budget._exact_levels`` reads a node's highest fitting level off its
sorted breakpoints instead of bisecting; it is the core of every cap, so it is checked
here against an independent, slow reference on random nodes: several classes (shifts),
floors and maximums, planned use below or above the floors, GPUs held down by a job
elsewhere (``below``), and budgets that bind in any of the three ways (band, margin, aim).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.budget import TOLERANCE_W, GpuTerms, _exact_levels

SPACING = 701.0


def node_fits(
    level: float,
    g: list[int],
    t: GpuTerms,
    below: np.ndarray,
    a1: float,
    a2: float,
    mm: float,
    a3: float,
) -> bool:
    cap = use = 0.0
    for i in g:
        lv = min(level, below[i]) - t.shift[i]
        cap += min(max(lv, t.floor_w[i]), t.max_w[i])
        use += min(max(lv, t.use_lo_w[i]), t.use_hi_w[i])
    return (use <= a1 and min(cap, use + mm) <= a2) or cap <= a3


@st.composite
def level_case(draw: st.DrawFn) -> tuple[GpuTerms, np.ndarray, np.ndarray, list[float]]:
    k = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(k)]
    seg = np.repeat(np.arange(k), sizes)
    n = len(seg)
    floats = st.floats(0, 1, allow_nan=False)
    rank = np.array([draw(st.integers(0, 2)) for _ in range(n)], dtype=float)
    floor = np.array([100 + 200 * draw(floats) for _ in range(n)])
    top = floor + np.array([50 + 600 * draw(floats) for _ in range(n)])
    demand = np.array([800 * draw(floats) for _ in range(n)])
    held = [draw(st.booleans()) for _ in range(n)]
    below = np.array(
        [
            rank[i] * SPACING + floor[i] + 700 * draw(floats) if held[i] else math.inf
            for i in range(n)
        ]
    )
    terms = GpuTerms(
        shift=rank * SPACING,
        floor_w=floor,
        max_w=top,
        use_lo_w=np.minimum(floor, demand),
        use_hi_w=np.minimum(demand, top),
    )
    lo_cap = np.bincount(seg, weights=floor)
    hi_cap = np.bincount(seg, weights=top)
    budgets = []
    for _ in range(3):  # a1, a2, a3: somewhere between every floor and every maximum
        frac = np.array([draw(st.floats(-0.1, 1.1)) for _ in range(k)])
        budgets.append(lo_cap + frac * (hi_cap - lo_cap))
    mm = np.array([300 * draw(floats) for _ in range(k)])
    if draw(st.booleans()):
        budgets[2] = np.full(k, -math.inf)  # no aim branch, as when the caller gives none
    return terms, seg, below, [*budgets, mm]


@settings(max_examples=300, deadline=None)
@given(level_case())
def test_exact_level_is_the_highest_that_fits(
    case: tuple[GpuTerms, np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    terms, seg, below, (a1, a2, a3, mm) = case
    a1, a2, a3 = a1 + TOLERANCE_W, a2 + TOLERANCE_W, a3 + TOLERANCE_W  # as allocate() does
    k = int(seg.max()) + 1
    got = _exact_levels(terms, seg, k, below, a1, a2, mm, a3)
    lo, hi = -1.0, 3 * SPACING + 1000.0
    for j in range(k):
        g = [int(i) for i in np.flatnonzero(seg == j)]
        args = (g, terms, below, float(a1[j]), float(a2[j]), float(mm[j]), float(a3[j]))
        if not node_fits(lo, *args) or node_fits(hi, *args):
            continue  # infeasible at the floors, or nothing binds: the caller never asks
        a, b = lo, hi
        for _ in range(60):  # the reference: bisection to far below a milliwatt
            mid = 0.5 * (a + b)
            a, b = (mid, b) if node_fits(mid, *args) else (a, mid)
        assert node_fits(got[j], *args), f"node {j}: level {got[j]} does not fit"
        assert got[j] == pytest.approx(a, abs=1e-3), f"node {j}"
