"""The exact water level of a node against a plain bisection written out GPU by GPU.

``controller.policy.budget._exact_levels`` reads a node's highest fitting level off its
sorted breakpoints instead of bisecting; it is the core of every cap, so it is checked
here against an independent, slow reference on random nodes: several classes (shifts),
floors and maximums, planned use below or above the floors, GPUs held down by a job
elsewhere (``below``), and budgets that bind in any of the three ways (band, margin, aim).

The level is unique: every sum rises with the level, so ``node_fits`` holds on a
half-line and "the highest level that fits" is its end, also where a sum is flat on an
interval (a plateau) whose value is exactly the budget. Those plateaus are where the
solver once went wrong (see the examples and ``test_plateau_at_budget_...`` below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy.budget import TOLERANCE_W, GpuTerms, _exact_levels, allocate
from controller.policy.index import tree_index
from tests.sites import tiny_site

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


def _terms(
    shift: list[float], floor: list[float], top: list[float], demand: list[float]
) -> GpuTerms:
    f, m, d = np.array(floor), np.array(top), np.array(demand)
    return GpuTerms(
        shift=np.array(shift),
        floor_w=f,
        max_w=m,
        use_lo_w=np.minimum(f, d),
        use_hi_w=np.minimum(d, m),
    )


# Found by hypothesis: planned use is flat at exactly the band budget (600 W) for levels
# 150..300; the solver, aiming 2 uW under the budget, stopped where the plateau begins.
PLATEAU_BAND = (
    _terms([0, 0, 0, 0], [100, 100, 100, 300], [150, 150, 150, 350], [0, 150, 150, 350]),
    np.array([0, 0, 0, 0]),
    np.full(4, math.inf),
    [np.array([600.0]), np.array([600.0]), np.array([600.0]), np.array([0.0])],
)
# Found by hypothesis: node 1's caps are flat at its aim (200 W, one GPU held down by a
# job a hair above its floor) up to level 801, where the second class leaves its floor;
# the solver stopped at 100.
PLATEAU_AIM = (
    _terms([0, 0, 701, 0], [100] * 4, [150] * 4, [0] * 4),
    np.array([0, 0, 1, 1]),
    np.array([100.0, 100.0, 1501.0, 100.00000000009308]),
    [np.full(2, 200.0), np.full(2, 200.0), np.full(2, 200.0), np.array([0.0, 300.0])],
)


@settings(max_examples=300, deadline=None)
@given(level_case())
@example(case=PLATEAU_BAND)
@example(case=PLATEAU_AIM)
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


def test_plateau_at_budget_strands_no_cap() -> None:
    """A rack whose planned use is flat at its band budget gets the caps at the plateau's end.

    tiny_site's rack-1 (8 GPUs, 100..500 W): six GPUs planned at 150 W, one at 400 W
    (floor 300), one idle. Planned use is 6 x 150 + 300 = 1200 W, exactly the band
    budget, for every level from 150 to 300; margin and aim do not bind. Every level in
    150..300 fits, so the caps are those at 300: the six get 300 W and the idle GPU 300 W.
    The solver once stopped at 150: 7 x 150 W = 1050 W of cap stranded under a budget
    it did not use, and a different answer from allocate's own bisection.
    """
    index = tree_index(PowerTree(parse_site(tiny_site())))
    n = index.n_gpus
    demand = [0.0] + [150.0] * 6 + [400.0] + [500.0] * 8
    floor = [100.0] * 7 + [300.0] + [100.0] * 8
    terms = _terms([0.0] * n, floor, [500.0] * n, demand)
    rack = index.pos["rack-1"]
    big = np.full(index.n_nodes, 1e6)
    a1 = big.copy()
    a1[rack] = 1200.0
    alloc = allocate(index, terms, a1, big.copy(), np.zeros(index.n_nodes))
    caps = alloc.caps(terms)
    np.testing.assert_allclose(caps[:7], 300.0, atol=1e-3)
    assert caps[7] == pytest.approx(300.0, abs=1e-3)  # at its floor either way
    assert np.all(caps[8:] == 500.0)  # rack-2 binds nowhere
    # Read back that the answer is within the budget, and is the highest that is.
    use = np.minimum(np.maximum(caps, terms.use_lo_w), terms.use_hi_w)
    assert use[:8].sum() <= 1200.0 + TOLERANCE_W
