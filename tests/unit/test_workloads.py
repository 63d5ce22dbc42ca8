"""Workload shapes against the published figures, the throughput curve, and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from sim.plant import Plant, Setpoints
from sim.scheduler import SimScheduler
from sim.trace import RequestTrace, load_azure_trace
from sim.workloads import (
    InferenceLoad,
    InferenceServiceSpec,
    ThroughputCurve,
    TrainingFleet,
    TrainingJobSpec,
    TrainingProfile,
    job_rng,
    sample_training_profile,
)
from tests.sites import tiny_site

PROFILE = TrainingProfile(
    compute_frac=0.96,
    comm_frac=0.40,
    period_s=2.0,
    compute_share=0.7,
    transition_s=0.03,
    checkpoint_every_s=120.0,
    checkpoint_s=10.0,
    checkpoint_frac=0.12,
    startup_s=5.0,
    startup_frac=0.15,
)


def run_fleet(
    profile: TrainingProfile, seconds: float, dt: float = 0.01, x: float = 1.0, work_s: float = 1e9
) -> tuple[TrainingFleet, np.ndarray]:
    fleet = TrainingFleet()
    fleet.add(profile, work_s, 8)
    fleet.start(0, 0.0)
    out = np.empty(round(seconds / dt))
    xs = np.array([x])
    for k in range(len(out)):
        t = k * dt
        out[k] = fleet.fracs(t)[0]
        fleet.advance(xs, t, dt)
    return fleet, out


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.text(min_size=1, max_size=8))
def test_sampled_training_profiles_stay_in_the_published_ranges(seed: int, name: str) -> None:
    p = sample_training_profile(job_rng(seed, name))
    assert 0.90 <= p.compute_frac <= 1.00
    assert 0.20 <= p.comm_frac <= 0.75
    assert 0.3 <= p.period_s <= 5.0
    assert 0.010 <= p.transition_s <= 0.050
    assert 600 <= p.checkpoint_every_s <= 1800
    assert p.checkpoint_frac <= 0.15
    assert p.checkpoint_s >= 5
    assert p == sample_training_profile(job_rng(seed, name))


def test_training_phases_levels_period_and_transitions() -> None:
    _, f = run_fleet(PROFILE, 100.0)
    it = f[round(6.0 / 0.01) :]  # after startup, before the first checkpoint
    assert it.max() == pytest.approx(0.96)
    assert it.min() == pytest.approx(0.40)
    # time in compute matches compute_share; transitions are a few tens of ms per edge
    assert np.mean(it > 0.9) == pytest.approx(0.7, abs=0.03)
    between = np.mean((it > 0.41) & (it < 0.95))
    assert between == pytest.approx(2 * 0.03 / 2.0, abs=0.01)
    rising = np.flatnonzero((it[1:] >= 0.68) & (it[:-1] < 0.68))
    assert np.diff(rising).mean() * 0.01 == pytest.approx(2.0, abs=0.02)


def test_startup_step_up_then_checkpoint_dips_then_step_down_at_the_end() -> None:
    fleet, f = run_fleet(PROFILE, 400.0, dt=0.05, work_s=300.0)
    dt = 0.05
    assert np.all(f[: round(4.9 / dt)] == pytest.approx(0.15))  # loading near idle
    assert f[round(5.0 / dt) : round(8.0 / dt)].max() == pytest.approx(0.96)  # stepped up
    dips = (f > 0) & (f <= 0.12 + 1e-12)
    starts = np.flatnonzero(dips[1:] & ~dips[:-1]) + 1
    ends = np.flatnonzero(~dips[1:] & dips[:-1]) + 1
    # checkpoints at 120 s and 240 s of progress (+5 s startup, +10 s for the first dip)
    assert starts * dt == pytest.approx([125.0, 255.0], abs=0.2)
    assert (ends - starts) * dt == pytest.approx([10.0, 10.0], abs=0.1)
    assert bool(fleet.finished[0])
    finish_s = (5 + 300 + 2 * 10) + 0.0
    assert np.all(f[round((finish_s + 0.2) / dt) :] == 0.0)  # done: the scheduler idles it
    assert np.any(f[round((finish_s - 2) / dt) : round((finish_s - 0.2) / dt)] > 0.3)


def test_throughput_curve_near_tdp_and_steeper_below() -> None:
    c = ThroughputCurve()
    slope_top = (c.rate(np.array([1.0]))[0] - c.rate(np.array([0.9]))[0]) / 0.1
    slope_low = (c.rate(np.array([0.6]))[0] - c.rate(np.array([0.5]))[0]) / 0.1
    assert slope_top == pytest.approx(0.3)
    assert slope_low > 1.0
    with pytest.raises(ValueError):
        ThroughputCurve(points=((0.0, 0.0), (1.0, 0.9)))


@pytest.mark.parametrize("cut", [0.02, 0.05, 0.10])
def test_capped_job_progresses_about_0p3_pct_slower_per_pct_of_power_cut(cut: float) -> None:
    flat = TrainingProfile(compute_frac=0.95, comm_frac=0.95, startup_s=0.0)
    full, _ = run_fleet(flat, 200.0, dt=0.1)
    capped, _ = run_fleet(flat, 200.0, dt=0.1, x=1.0 - cut)
    slowdown = 1.0 - capped.done_s[0] / full.done_s[0]
    assert slowdown == pytest.approx(0.3 * cut, rel=0.01)
    assert capped.delivered_gpu_s[0] < capped.demanded_gpu_s[0] == full.demanded_gpu_s[0]


def test_capped_job_through_the_plant_runs_longer() -> None:
    """Two identical jobs on the tiny site; one rack's GPUs capped 10 % below TDP."""
    tree = PowerTree(parse_site(tiny_site()))
    plant = Plant(tree)
    flat = TrainingProfile(compute_frac=1.0, comm_frac=1.0, startup_s=0.0, checkpoint_every_s=1e9)
    sched = SimScheduler(
        tree,
        [TrainingJobSpec(f"j{i}", 8, 60.0, profile=flat) for i in range(2)],
        seed=3,
    )
    limit = np.full(16, 500.0)
    limit[:8] = 450.0
    state = plant.initial_state(limit_w=limit)
    t, dt = 0.0, 0.1
    finished: dict[str, float] = {}
    while len(finished) < 2 and t < 200:
        d = sched.demand_w(t)
        state = plant.step(state, Setpoints(d, limit), dt)
        sched.advance(t, dt, state.gpu_power_w, state.dark_gpu)
        t = state.t_s
        finished.update({e.job_id: e.t_s for e in sched.events if e.kind == "finished"})
    assert finished["j1"] == pytest.approx(60.0, abs=0.15)
    # x = 450 W over the largest demand among j0's GPUs (TDP x spread, spread in [0.97, 1])
    x = 450.0 / d_max if (d_max := float(sched.gpu_tdp_w[:8].max())) > 450 else 1.0
    expected = 60.0 / ThroughputCurve().rate(np.array([x]))[0]
    assert finished["j0"] == pytest.approx(expected, abs=0.15)
    assert finished["j0"] > finished["j1"] * 1.02
    assert sched.work()["training"].delivered_gpu_s == pytest.approx(2 * 8 * 60.0)


def one_request_trace(ctx: int, gen: int, at_s: float = 1.0) -> RequestTrace:
    return RequestTrace(np.array([at_s]), np.array([ctx]), np.array([gen]), period_s=1e9)


def sample(load: InferenceLoad, seconds: float, dt: float = 0.01) -> np.ndarray:
    return np.array([load.fracs(k * dt).copy() for k in range(round(seconds / dt))])


@pytest.mark.parametrize(("ctx", "gen"), [(100, 10), (1020, 129), (14050, 1000)])
def test_inference_request_is_a_prefill_burst_then_a_decode_plateau(ctx: int, gen: int) -> None:
    spec = InferenceServiceSpec("svc", 1)
    load = InferenceLoad(spec, seed=0, trace=one_request_trace(ctx, gen))
    dt = 0.01
    f = sample(load, 1.0 + 1.0 + gen * spec.decode_s_per_token + 1.0, dt)[:, 0]
    burst = f >= 1.0
    assert burst.any()
    prefill_s = burst.sum() * dt
    assert prefill_s < 1.0
    assert prefill_s == pytest.approx(min(0.02 + 1.5e-4 * ctx, 0.95), abs=dt + 1e-9)
    decode = (f >= 0.2) & (f <= 0.45)
    assert decode.sum() * dt == pytest.approx(gen * 0.03, abs=dt + 1e-9)
    assert np.flatnonzero(decode)[0] == np.flatnonzero(burst)[-1] + 1  # decode follows prefill
    idle = ~burst & ~decode
    assert np.all(f[idle] == pytest.approx(spec.idle_frac))


def test_azure_inference_levels_and_counts() -> None:
    """An hour of the real trace over 16 replicas: only idle, decode band or prefill burst."""
    tr = load_azure_trace()
    assert len(tr) == 19366
    assert tr.arrival_s[0] == 0.0
    assert np.all(np.diff(tr.arrival_s) >= 0)
    spec = InferenceServiceSpec("svc", 16, gpus_per_replica=1)
    load = InferenceLoad(spec, seed=5)
    f = sample(load, 120.0, dt=0.05)
    busy = f[f != spec.idle_frac]
    in_decode = (busy >= 0.2) & (busy <= 0.45)
    in_prefill = busy >= 1.0
    assert np.all(in_decode | in_prefill)
    assert 0.02 < in_prefill.mean() < 0.5
    assert load.requests == 19366  # the first hour was generated in one block
    half = InferenceLoad(InferenceServiceSpec("svc", 16, scale=0.5), seed=5)
    half.fracs(0.0)
    assert half.requests == pytest.approx(19366 / 2, rel=0.03)
    daily = InferenceServiceSpec("svc", 16, daily_amplitude=0.5, start_hour=2.0, peak_hour=14.0)
    night = InferenceLoad(daily, seed=5)
    night.fracs(0.0)
    assert night.requests == pytest.approx(19366 * 0.5, rel=0.05)  # 2-3 am: 1 + 0.5 cos(pi)


def test_poisson_arrival_rate() -> None:
    load = InferenceLoad(
        InferenceServiceSpec("p", 8, arrivals="poisson", rate_per_s=3.0, block_s=1000.0), seed=1
    )
    load.fracs(0.0)
    assert load.requests == pytest.approx(3000, rel=0.1)


def run_site(seed: int, steps: int = 300) -> list[np.ndarray]:
    tree = PowerTree(parse_site(tiny_site()))
    plant = Plant(tree)
    sched = SimScheduler(
        tree,
        [
            TrainingJobSpec("train", 8, 1e6),
            InferenceServiceSpec("svc", 8, gpus_per_replica=2, scale=0.5),
        ],
        seed=seed,
    )
    state = plant.initial_state()
    limit = np.full(16, 400.0)
    t, out = 0.0, []
    for _ in range(steps):
        d = sched.demand_w(t)
        state = plant.step(state, Setpoints(d, limit), 0.1)
        sched.advance(t, 0.1, state.gpu_power_w, state.dark_gpu)
        t = state.t_s
        out.append(state.gpu_power_w)
    return out


def test_same_seed_same_run_bit_for_bit() -> None:
    a, b, c = run_site(7), run_site(7), run_site(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
