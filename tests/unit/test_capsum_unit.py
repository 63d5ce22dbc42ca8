"""controller/policy/capsum.py on its own: exposures, the raise gate, fitting lowers.

These are the pieces the cap-sum guarantee rests on (the closed-loop harness is
tests/unit/test_policy_capsum.py). Each test drives the functions with hand-made
arrays on the tiny site's index (feed > sst > bus > row > rack-1 | rack-2, 8 GPUs per
rack), so a failure names the rule that broke, not a scenario.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.capsum import (
    CONFIRM_W,
    EARLIER,
    SUPERSEDE_S,
    ExposureMemory,
    after_commands,
    exposure_now,
    fit_lowers,
    gate_raises,
    per_gpu_min,
)
from controller.policy.index import TreeIndex, tree_index
from tests.helpers.policy_support import tree_for

NAN = float("nan")
BIG_W = 1e9  # a budget that never binds
RACK_1, RACK_2, ROW = 4, 5, 3  # positions in index.node_ids (checked below)


@pytest.fixture(scope="module")
def index() -> TreeIndex:
    idx = tree_index(tree_for())
    assert idx.node_ids == ("feed", "sst", "bus", "row", "rack-1", "rack-2")
    return idx


def a(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def memory(
    confirmed: np.ndarray,
    sent_max: np.ndarray,
    report: np.ndarray,
    changed: np.ndarray,
    earlier: np.ndarray | None = None,
) -> ExposureMemory:
    """``earlier``: per GPU the limits sent since the confirmation before the last one."""
    n = confirmed.size
    return ExposureMemory(
        confirmed_w=confirmed,
        sent_max_w=sent_max,
        last_report_w=report,
        changed_s=changed,
        earlier_w=np.full((n, EARLIER), np.nan) if earlier is None else earlier,
        overflow=np.zeros(n, dtype=bool),
    )


def budgets(rack_1_w: float = BIG_W, rack_2_w: float = BIG_W, row_w: float = BIG_W) -> np.ndarray:
    out = np.full(6, BIG_W)
    out[RACK_1], out[RACK_2], out[ROW] = rack_1_w, rack_2_w, row_w
    return out


# ---------------------------------------------------------------------------
# exposure_now


def test_before_any_report_a_gpu_may_be_at_its_maximum() -> None:
    mem = ExposureMemory.unknown(a(500.0, 1000.0))
    seen = exposure_now(mem, a(NAN, NAN), a(300.0, 300.0), 0.0)
    assert list(seen.exposure_w) == [500.0, 1000.0]
    assert not seen.confirmed.any()


def test_a_report_equal_to_the_command_confirms_it() -> None:
    """A lower to 300 W sent, and the agent reports 300 W (to within CONFIRM_W)."""
    mem = memory(a(500.0, 500.0, 500.0), a(300.0, 300.0, 300.0), a(500.0, 500.0, 500.0), a(0, 0, 0))
    report = a(300.0, 300.0 + CONFIRM_W, 300.0 + CONFIRM_W + 1.0)
    seen = exposure_now(mem, report, a(300.0, 300.0, 300.0), 1.0)
    assert list(seen.confirmed) == [True, True, False]
    assert list(seen.exposure_w) == [300.0, 300.0, 500.0]  # the last: old limit may hold


def test_a_lower_in_flight_leaves_the_old_limit_exposed() -> None:
    mem = memory(a(500.0), a(300.0), a(500.0), a(0.0))
    seen = exposure_now(mem, a(500.0), a(300.0), 0.5)
    assert not seen.confirmed[0]
    assert seen.exposure_w[0] == 500.0


def test_a_raise_in_flight_is_exposed_at_once() -> None:
    """Confirmed at 300 W, a raise to 450 W sent: it may land any moment."""
    mem = memory(a(300.0), a(450.0), a(300.0), a(0.0))
    seen = exposure_now(mem, a(300.0), a(450.0), 0.5)
    assert not seen.confirmed[0]
    assert seen.exposure_w[0] == 450.0


def test_a_higher_report_than_anything_sent_is_believed() -> None:
    """A limit raised behind the controller's back (by hand, a reset) is exposed as reported."""
    mem = memory(a(300.0), a(-np.inf), a(300.0), a(-np.inf))
    seen = exposure_now(mem, a(480.0), a(300.0), 5.0)
    assert seen.exposure_w[0] == 480.0
    assert not seen.confirmed[0]


def test_a_lower_report_after_a_raise_then_a_lower_is_ambiguous_until_superseded() -> None:
    """Confirmed at 300 W; 450 W sent, then 300 W again before 450 W was confirmed. A
    report of 300 W may predate the 450 W landing, so it confirms only once the last
    change is SUPERSEDE_S old; until then 450 W may still be enforced."""
    mem = memory(a(300.0), a(450.0), a(300.0), a(10.0))  # last change at 10 s
    early = exposure_now(mem, a(300.0), a(300.0), 10.0 + SUPERSEDE_S - 0.5)
    assert not early.confirmed[0]
    assert early.exposure_w[0] == 450.0
    late = exposure_now(mem, a(300.0), a(300.0), 10.0 + SUPERSEDE_S)
    assert late.confirmed[0]
    assert late.exposure_w[0] == 300.0


def test_a_report_of_a_value_never_in_force_before_confirms_at_once() -> None:
    """Confirmed at 300 W; 450 W sent, then 350 W. No limit before was 350 W, so a report
    of 350 W can only be the latest landing (after the 450 W, in order): confirmed. Had
    350 W been sent before the 450 W too, the report would be ambiguous again."""
    mem = memory(a(300.0), a(450.0), a(300.0), a(10.0))
    seen = exposure_now(mem, a(350.0), a(350.0), 11.0)
    assert seen.confirmed[0] and seen.exposure_w[0] == 350.0
    earlier = np.full((1, EARLIER), np.nan)
    earlier[0, 0] = 450.0
    earlier[0, 1] = 350.0
    mem = memory(a(300.0), a(450.0), a(300.0), a(10.0), earlier)
    seen = exposure_now(mem, a(350.0), a(350.0), 11.0)
    assert not seen.confirmed[0] and seen.exposure_w[0] == 450.0


def test_a_gpu_with_no_report_keeps_what_it_had() -> None:
    """Telemetry gap: the last report still counts, nothing is confirmed."""
    mem = memory(a(500.0, 300.0), a(300.0, -np.inf), a(500.0, 300.0), a(0.0, -np.inf))
    seen = exposure_now(mem, a(NAN, NAN), a(300.0, 300.0), 1.0)
    assert not seen.confirmed.any()
    assert list(seen.exposure_w) == [500.0, 300.0]
    assert list(seen.report_w) == [500.0, 300.0]


# ---------------------------------------------------------------------------
# after_commands


def test_after_commands_resets_on_confirmation_and_records_what_was_sent() -> None:
    mem = memory(
        a(500.0, 500.0, 500.0), a(300.0, 300.0, -np.inf), a(500.0, 500.0, 500.0), a(1, 1, 1)
    )
    seen = exposure_now(mem, a(300.0, 500.0, 500.0), a(300.0, 300.0, 500.0), 2.0)
    assert list(seen.confirmed) == [True, False, True]
    sent = a(300.0, 250.0, 500.0)  # 0: unchanged, 1: lowered again, 2: unchanged
    new = after_commands(mem, seen, a(300.0, 300.0, 500.0), sent, 2.0)
    assert list(new.confirmed_w) == [300.0, 500.0, 500.0]
    # 0: confirmed, nothing new sent; 1: 300 then 250 still unconfirmed, 300 the highest
    assert list(new.sent_max_w) == [-np.inf, 300.0, -np.inf]
    assert list(new.changed_s) == [1.0, 2.0, 1.0]
    assert list(new.last_report_w) == [300.0, 500.0, 500.0]


def test_a_lower_frees_room_for_a_raise_only_once_it_is_confirmed(index: TreeIndex) -> None:
    """GPU 0 must fall 500 -> 300 W so GPU 1 may rise 300 -> 500 W under a rack whose
    caps may sum to 800 W (six idle GPUs at 100 W take the rest of 1400 W). The agent
    confirms the lower one cycle late. The raise is sent only in the cycle after, and the
    most that could be enforced under the rack never exceeds its budget."""
    n = index.n_gpus
    desired = np.full(n, 100.0)
    desired[:2] = (300.0, 500.0)
    prev = desired.copy()
    prev[:2] = (500.0, 300.0)
    mem = memory(prev.copy(), np.full(n, -np.inf), prev.copy(), np.full(n, -np.inf))
    budget = budgets(rack_1_w=1400.0)
    reports = [prev.copy(), prev.copy()]  # GPU 0 still reports 500 W in the 2nd cycle
    reports.append(desired.copy())
    reports[-1][1] = 300.0  # 3rd cycle: the lower has landed, GPU 1 still at 300 W
    sent_history = []
    for k, report in enumerate(reports):
        seen = exposure_now(mem, report, prev, 0.5 * k)
        lowered = np.minimum(prev, desired)
        out, waiting = gate_raises(
            index, lowered, desired, seen.exposure_w, budget, np.zeros(n, bool)
        )
        worst = np.maximum(np.maximum(out, seen.exposure_w), report)
        assert index.seg_sum(worst)[RACK_1] <= 1400.0, k
        mem = after_commands(mem, seen, prev, out, 0.5 * k)
        prev = out
        sent_history.append((out[0], out[1], bool(waiting[RACK_1])))
    assert sent_history == [(300.0, 300.0, True), (300.0, 300.0, True), (300.0, 500.0, False)]


# ---------------------------------------------------------------------------
# gate_raises


def test_raises_share_the_room_in_proportion(index: TreeIndex) -> None:
    """200 W of room under rack-1, four GPUs asking 100 W more each: each gets half."""
    n = index.n_gpus
    held = np.full(n, 400.0)
    desired = held.copy()
    desired[:4] = 500.0
    out, waiting = gate_raises(
        index, held, desired, held, budgets(rack_1_w=3400.0), np.zeros(n, bool)
    )
    assert list(out[:8]) == [450.0] * 4 + [400.0] * 4
    assert index.seg_sum(out)[RACK_1] == 3400.0
    assert waiting[RACK_1] and not waiting[RACK_2]
    assert np.all(out[8:] == 400.0)


def test_the_tightest_node_above_a_gpu_decides_its_share(index: TreeIndex) -> None:
    """rack-2 has room for all its raises, the row for a quarter of them."""
    n = index.n_gpus
    held = np.full(n, 400.0)
    desired = held.copy()
    desired[8:12] = 500.0  # 400 W asked under rack-2
    budget = budgets(rack_2_w=BIG_W, row_w=16 * 400.0 + 100.0)
    out, waiting = gate_raises(index, held, desired, held, budget, np.zeros(n, bool))
    assert list(out[8:12]) == [425.0] * 4
    assert index.seg_sum(out)[ROW] <= budget[ROW]
    assert waiting[ROW] and not waiting[RACK_1]  # the row is the node that waits


def test_a_raise_up_to_the_exposure_is_free_where_exposures_fit(index: TreeIndex) -> None:
    """A limit lowered 500 -> 400 W whose lower is not confirmed may go back to 500 W at
    no cost: 500 W may be enforced already, and the exposures fit the budget."""
    n = index.n_gpus
    exposure = np.full(n, 300.0)
    exposure[:4] = 500.0  # 4 x 500 + 4 x 300 = 3200 W of 3400 W
    lowered = exposure.copy()
    lowered[:4] = 400.0
    desired = exposure.copy()
    out, waiting = gate_raises(
        index, lowered, desired, exposure, budgets(rack_1_w=3400.0), np.zeros(n, bool)
    )
    assert np.all(out[:4] == 500.0)
    assert not waiting[RACK_1]


def test_no_raise_at_all_under_a_node_whose_exposures_do_not_fit(index: TreeIndex) -> None:
    """Lowers from 500 W in flight under rack-1 (the exposures sum to 4000 W on a 3400 W
    budget): the real limits may already be low, so even a raise back up to a GPU's own
    exposure could be the one that overdraws. It stalls, and the node says it waits.
    rack-2, which fits, raises as usual."""
    n = index.n_gpus
    exposure = np.full(n, 500.0)
    exposure[8:] = 400.0
    lowered = np.full(n, 400.0)
    lowered[:8] = 425.0
    desired = lowered.copy()
    desired[0] = 450.0
    desired[8] = 425.0
    out, waiting = gate_raises(
        index,
        lowered,
        desired,
        exposure,
        budgets(rack_1_w=3400.0, rack_2_w=3400.0),
        np.zeros(n, bool),
    )
    assert out[0] == 425.0
    assert out[8] == 425.0
    assert waiting[RACK_1] and not waiting[RACK_2]


def test_blocked_gpus_are_not_raised_and_do_not_wait(index: TreeIndex) -> None:
    n = index.n_gpus
    held = np.full(n, 300.0)
    desired = np.full(n, 500.0)
    blocked = np.zeros(n, bool)
    blocked[:8] = True
    out, waiting = gate_raises(index, held, desired, held, budgets(), blocked)
    assert np.all(out[:8] == 300.0)
    assert np.all(out[8:] == 500.0)
    assert not waiting.any()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(100.0, 500.0), min_size=16, max_size=16),
    st.lists(st.floats(0.0, 200.0), min_size=16, max_size=16),
    st.lists(st.floats(100.0, 500.0), min_size=16, max_size=16),
    st.lists(st.floats(-0.3, 1.0), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_gate_raises_never_takes_what_may_be_enforced_past_a_budget(
    lowered_l: list[float],
    above_l: list[float],
    desired_l: list[float],
    slack: list[float],
    blocked_l: list[bool],
) -> None:
    """Under every node whose exposures fit, the limits sent (or the exposures, whichever
    is higher) still fit; under one whose exposures do not, nothing rises; nothing goes
    below this cycle's lowered limits or above what is wanted."""
    index = tree_index(tree_for())
    lowered = np.array(lowered_l)
    exposure = lowered + np.array(above_l)
    desired = np.array(desired_l)
    held = index.seg_sum(np.maximum(exposure, lowered))
    budget = held.copy()
    budget[RACK_1] += 800.0 * slack[0]
    budget[RACK_2] += 800.0 * slack[1]
    budget[: ROW + 1] = held[: ROW + 1] + 1600.0 * slack[2]
    out, _ = gate_raises(index, lowered, desired, exposure, budget, np.array(blocked_l))
    assert np.all(out >= lowered)
    assert np.all(out <= np.maximum(desired, lowered))
    assert np.all(out[np.array(blocked_l)] == lowered[np.array(blocked_l)])
    fits = budget >= held
    under_unfit = per_gpu_min(index, np.where(fits, 1.0, 0.0)) < 0.5
    assert np.all(out[under_unfit] == lowered[under_unfit])
    sums = index.seg_sum(np.maximum(out, exposure))
    assert np.all(sums[fits] <= budget[fits] + 1e-6)


# ---------------------------------------------------------------------------
# fit_lowers and per_gpu_min


def test_per_gpu_min_is_the_tightest_node_above(index: TreeIndex) -> None:
    values = a(10.0, 20.0, 30.0, 40.0, 5.0, 50.0)
    out = per_gpu_min(index, values)
    assert np.all(out[:8] == 5.0) and np.all(out[8:] == 10.0)


def test_fit_lowers_takes_the_small_lowers_only_under_an_over_budget_node(
    index: TreeIndex,
) -> None:
    """Small lowers (under the deadband) were skipped: rack-1 is left 16 W over its budget,
    rack-2 is not. Under rack-1 every GPU takes its desired limit; rack-2 keeps its own."""
    n = index.n_gpus
    new = np.full(n, 427.0)  # 8 x 427 = 3416 W
    desired = np.full(n, 425.0)  # 8 x 425 = 3400 W
    budget = budgets(rack_1_w=3400.0, rack_2_w=3416.0)
    out = fit_lowers(index, new, desired, budget)
    assert np.all(out[:8] == 425.0)
    assert np.all(out[8:] == 427.0)
    assert np.all(index.seg_sum(out) <= budget)


def test_fit_lowers_never_raises_and_leaves_a_fitting_tree_alone(index: TreeIndex) -> None:
    n = index.n_gpus
    new = np.full(n, 400.0)
    desired = np.full(n, 450.0)
    new[0] = 500.0  # over rack-1: 3300 W on 3200 W
    out = fit_lowers(index, new, desired, budgets(rack_1_w=3200.0))
    assert out[0] == 450.0 and np.all(out[1:] == 400.0)  # desired above new: new kept
    same = fit_lowers(index, new, desired, budgets())
    assert same is new


def test_fit_lowers_under_an_over_budget_row_touches_both_racks(index: TreeIndex) -> None:
    n = index.n_gpus
    new = np.full(n, 430.0)
    desired = np.full(n, 420.0)
    out = fit_lowers(index, new, desired, budgets(row_w=16 * 425.0))
    assert np.all(out == 420.0)
