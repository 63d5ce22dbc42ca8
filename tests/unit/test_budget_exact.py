"""The exact water level of a node against a plain bisection written out GPU by GPU.

``controller.policy.budget._exact_levels`` reads a node's highest fitting level off its
sorted breakpoints instead of bisecting; it is the core of every cap, so it is checked
here against an independent, slow reference on random nodes: several classes (shifts),
floors and maximums (a tier's floor is the tier below, so a GPU may have no range),
GPUs held down by a job elsewhere (``below``), GPUs under no node of the level, and
budgets anywhere from below every floor to above every maximum. The only constraint is
the cap sum (budget.py's docstring says why).

The level is unique: the cap sum rises with the level, so ``node_fits`` holds on a
half-line and "the highest level that fits" is its end, also where the sum is flat on
an interval (a plateau) whose value is exactly the budget. Those plateaus are where
the solver once went wrong (see the examples and ``test_plateau_at_budget_...`` below).
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


def node_fits(level: float, g: list[int], t: GpuTerms, below: np.ndarray, limit: float) -> bool:
    cap = 0.0
    for i in g:
        lv = min(level, below[i]) - t.shift[i]
        cap += min(max(lv, t.floor_w[i]), t.max_w[i])
    return cap <= limit


def _terms(shift: list[float], floor: list[float], top: list[float]) -> GpuTerms:
    return GpuTerms(shift=np.array(shift), floor_w=np.array(floor), max_w=np.array(top))


@st.composite
def level_case(draw: st.DrawFn) -> tuple[GpuTerms, np.ndarray, np.ndarray, np.ndarray]:
    k = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(k)]
    seg = np.repeat(np.arange(k), sizes)
    if draw(st.booleans()):  # GPUs under no node of this level (-1), as on mixed sites
        seg = np.where([draw(st.booleans()) for _ in seg], seg, -1)
    n = len(seg)
    floats = st.floats(0, 1, allow_nan=False)
    rank = np.array([draw(st.integers(0, 2)) for _ in range(n)], dtype=float)
    floor = np.array([100 + 200 * draw(floats) for _ in range(n)])
    # Some GPUs with no range at all (a tier whose top is the tier below).
    width = [draw(st.sampled_from([0.0, 50 + 600 * draw(floats)])) for _ in range(n)]
    top = floor + np.array(width)
    held = [draw(st.booleans()) for _ in range(n)]
    below = np.array(
        [
            rank[i] * SPACING + floor[i] + 700 * draw(floats) if held[i] else math.inf
            for i in range(n)
        ]
    )
    terms = GpuTerms(shift=rank * SPACING, floor_w=floor, max_w=top)
    under = seg >= 0
    lo_cap = np.bincount(seg[under], weights=floor[under], minlength=k)
    hi_cap = np.bincount(seg[under], weights=top[under], minlength=k)
    frac = np.array([draw(st.floats(-0.1, 1.1)) for _ in range(k)])
    return terms, seg, below, lo_cap + frac * (hi_cap - lo_cap)


# Found by hypothesis (then on planned use; here the same sums as caps): the cap sum is
# flat at exactly the budget (600 W) for levels 150..300; the solver, aiming 2 uW under
# the budget, stopped where the plateau begins.
PLATEAU_START = (
    _terms([0, 0, 0, 0], [0, 100, 100, 300], [0, 150, 150, 350]),
    np.array([0, 0, 0, 0]),
    np.full(4, math.inf),
    np.array([600.0]),
)
# Found by hypothesis: node 1's caps are flat at its budget (200 W, one GPU held down
# by a job a hair above its floor) up to level 801, where the second class leaves its
# floor; the solver stopped at 100.
PLATEAU_HELD = (
    _terms([0, 0, 701, 0], [100] * 4, [150] * 4),
    np.array([0, 0, 1, 1]),
    np.array([100.0, 100.0, 1501.0, 100.00000000009308]),
    np.full(2, 200.0),
)


@settings(max_examples=300, deadline=None)
@given(level_case())
@example(case=PLATEAU_START)
@example(case=PLATEAU_HELD)
def test_exact_level_is_the_highest_that_fits(
    case: tuple[GpuTerms, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    terms, seg, below, budget = case
    limit = budget + TOLERANCE_W  # as allocate() does
    k = budget.size
    got = _exact_levels(terms, seg, k, below, limit)
    lo, hi = -1.0, 3 * SPACING + 1000.0
    for j in range(k):
        g = [int(i) for i in np.flatnonzero(seg == j)]
        args = (g, terms, below, float(limit[j]))
        if not node_fits(lo, *args) or node_fits(hi, *args):
            continue  # infeasible at the floors, or nothing binds: the caller never asks
        a, b = lo, hi
        for _ in range(60):  # the reference: bisection to far below a milliwatt
            mid = 0.5 * (a + b)
            a, b = (mid, b) if node_fits(mid, *args) else (a, mid)
        assert node_fits(got[j], *args), f"node {j}: level {got[j]} does not fit"
        assert got[j] == pytest.approx(a, abs=1e-3), f"node {j}"


def test_plateau_at_budget_strands_no_cap() -> None:
    """A rack whose cap sum is flat at its budget returns the level at the plateau's end.

    tiny_site's rack-1 (8 GPUs, 100..500 W), filling a tier: six GPUs may rise from
    100 W to 150 W, one from 300 W to 400 W, one is at its tier's top (100 W). The cap
    sum is 6 x 150 + 300 + 100 = 1300 W, exactly the budget, for every level from 150 to
    300, so every level there fits and the answer is 300. The caps in rack-1 are the
    same on the whole plateau, but the level is not harmless: a synchronous job is held
    to its lowest level everywhere (rackpower's job-wide pass), so its GPU in rack-2
    (rack-2 binds nowhere) gets a 300 W cap from it. The solver once stopped at the
    plateau's start, 150: 150 W of that GPU's cap stranded under a budget with room.
    """
    index = tree_index(PowerTree(parse_site(tiny_site())))
    n = index.n_gpus
    floor = [100.0] * 6 + [300.0] + [100.0] + [100.0] * 8
    top = [150.0] * 6 + [400.0] + [100.0] + [500.0] * 8
    terms = _terms([0.0] * n, floor, top)
    budget = np.full(index.n_nodes, 1e6)
    budget[index.pos["rack-1"]] = 1300.0
    alloc = allocate(index, terms, budget)
    assert alloc.level[:8].min() == pytest.approx(300.0, abs=1e-3)
    caps = alloc.caps(terms)
    np.testing.assert_allclose(caps[:8], [150.0] * 6 + [300.0, 100.0], atol=1e-3)
    assert np.all(caps[8:] == 500.0)  # rack-2 binds nowhere
    # GPU 8 (rack-2) in a job with rack-1's GPUs: held to the job's lowest level.
    held = np.full(n, np.inf)
    held[8] = alloc.level[:8].min()
    second = allocate(index, terms, budget, level_cap=held)
    assert second.caps(terms)[8] == pytest.approx(300.0, abs=1e-3)
    # Read back that rack-1's caps are within the budget.
    assert caps[:8].sum() <= 1300.0 + TOLERANCE_W


def test_budget_binds_by_class_and_reads_back() -> None:
    """Two classes in one rack: the higher fills to its maximum before the lower leaves
    its floor, and every node's caps sum to at most its budget (read back from caps)."""
    index = tree_index(PowerTree(parse_site(tiny_site())))
    n = index.n_gpus
    spacing = 501.0
    shift = [0.0] * 4 + [spacing] * 12  # rack-1's first server is the higher class (rank 0)
    terms = _terms(shift, [100.0] * n, [500.0] * n)
    budget = np.full(index.n_nodes, 1e6)
    budget[index.pos["rack-1"]] = 4 * 500.0 + 4 * 100.0 + 200.0
    budget[index.pos["row"]] = 6000.0
    alloc = allocate(index, terms, budget, n_classes=2)
    caps = alloc.caps(terms)
    np.testing.assert_allclose(caps[:4], 500.0, atol=1e-3)
    np.testing.assert_allclose(caps[4:8], 150.0, atol=1e-3)
    assert (index.seg_sum(caps) <= budget + TOLERANCE_W).all()
    # The row binds rack-2 (6000 - 2600 = 3400 W for 8 GPUs): 425 W each.
    np.testing.assert_allclose(caps[8:], 425.0, atol=1e-3)
    assert (alloc.binding[:8] == index.pos["rack-1"]).all()
    assert (alloc.binding[8:] == index.pos["row"]).all()
