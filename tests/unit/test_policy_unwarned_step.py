"""An idle GPU server the controller knows no job for can step to its maximum unwarned.

Seen in ``rackpower demo`` (which gives the controller no job list): every rack's caps
were released while its GPUs idled, then a training job started on row-1-rack-1 and its
32 GPUs stepped from ~116 W to 700 W in one plant step: 29.2 kW on a 23.4 kW envelope
(above the 25 kW rating) for 0.8 s, until the caps bit. The start-up reservation
(startup.py) needs the job in the list to see it coming; the learned margin (at most
15 % of the envelope) cannot cover a whole rack stepping from idle.

Under the cap-sum design no rule for idle GPUs is needed: an idle GPU's cap counts in
full against its rack's budget, so the caps under an oversubscribed rack sum to at most
its budget however idle its GPUs are, and the step lands on them. Closed loops on the
toy plant of ``tests.helpers.policy_support`` (GPUs draw min(demand, limit) at once,
meters read the exact sum), no jobs, as in the demo.
"""

from __future__ import annotations

import numpy as np

from controller.cli.demo_cmd import DEMO_SITE
from controller.model.loader import load_site
from controller.model.topology import PowerTree
from controller.policy import Snapshot, decide
from sim.plant import Plant, Setpoints
from sim.runtime import default_workloads
from sim.scheduler import SchedulerConfig, SimScheduler
from tests.helpers.policy_support import Run, tree_for

ENVELOPE_W = 3800.0  # rack-1: 8 GPUs of 100-500 W + 400 W of baselines = 4400 W at most
BUDGET_W = ENVELOPE_W - 400.0  # what rack-1's GPU caps may sum to
IDLE_W = 60.0


def rack1(power: np.ndarray) -> float:
    return float(power[:8].sum() + 400)


def test_an_idle_rack_without_jobs_cannot_step_over_its_envelope() -> None:
    """20 s of idle (longer than every demand window), then all 8 GPUs step to 480 W.

    Released to their maximum, the step is 4240 W on the 3800 W rack. The idle GPUs'
    caps count in full, so they sum to the budget while the rack idles, and the step
    stops at the envelope."""
    run = Run(tree_for())
    run.repeat(40, lambda _: np.full(16, IDLE_W))
    assert all(caps[:8].sum() <= BUDGET_W for caps in run.limits)
    run.repeat(6, lambda _: np.full(16, 480.0))
    worst = max(rack1(p) for p in run.powers)
    assert worst <= ENVELOPE_W, f"rack-1 reached {worst:.0f} W on a {ENVELOPE_W:.0f} W envelope"
    assert rack1(run.powers[-1]) >= ENVELOPE_W - 9.0  # and it then runs at its envelope


def test_a_busy_neighbour_keeps_its_draw_and_the_idle_server_gets_what_is_left() -> None:
    """The idle server's reserve comes last: it is capped at what its busy neighbour
    leaves, not at an even share that would cut the neighbour's running job."""
    busy = np.array([450.0] * 4 + [IDLE_W] * 4 + [IDLE_W] * 8)
    run = Run(tree_for())
    run.repeat(40, lambda _: busy)
    assert np.all(run.powers[-1][:4] == 450.0)  # the running server is not cut
    assert np.all(run.limit_w[:4] >= 450.0)
    assert np.all(run.limit_w[4:8] < 500.0)  # the idle one holds a cap
    stepped = busy.copy()
    stepped[4:8] = 480.0
    run.step(stepped)  # the idle server's job starts
    assert rack1(run.powers[-1]) <= ENVELOPE_W
    assert np.all(run.powers[-1][:4] == 450.0)  # and the step took nothing from the busy one


def test_the_demo_plant_without_a_job_list_stays_inside_every_rack_envelope() -> None:
    """The demo's plant and workloads (seed 1), the policy fed no jobs as the demo does,
    on the simulator's plant model (limits land 0.2 s after they are asked for, converter
    losses) with telemetry one cycle old. Before the fix every cap was released by t=10 s
    and row-1-rack-1 reached 1.247x its envelope at t=14 s when its first job started."""
    tree = PowerTree(load_site(DEMO_SITE))
    plant = Plant(tree)
    classes = tuple(c.name for c in tree.site.policy.priority_classes)
    sched = SimScheduler(tree, seed=1, config=SchedulerConfig(priority_classes=classes))
    for spec in default_workloads(tree, 1, classes):
        sched.submit(spec)
    state = plant.initial_state(demand_w=sched.demand_w(0.0))
    metered = [n for n in plant.node_ids if tree.node(n).meters or tree.node(n).agent]
    racks = tree.of_kind("rack")
    rack_pos = [plant.node_ids.index(r) for r in racks]
    envelope = np.array([tree.node(r).envelope_w for r in racks])
    step_s, every = 0.1, 5  # the demo's plant step and its 0.5 s cycle
    seen = state
    policy_state = None
    request = None
    worst = 0.0
    for i in range(round(30.0 / step_s)):
        t = i * step_s
        if i % every == 0:
            power = plant.node_power(seen)
            snap = Snapshot.build(
                tree,
                t,
                gpu_power_w=seen.gpu_power_w,
                gpu_limit_w=seen.gpu_limit_w,
                node_power_w={n: power[n] for n in metered},
            )
            _, policy_state = decide(snap, tree, policy_state)
            request = np.asarray(policy_state.target_w)
            seen = state  # what the next cycle reads: this cycle's plant
        state = plant.step(state, Setpoints(sched.demand_w(t), request), step_s)
        request = None
        sched.advance(t, step_s, state.gpu_power_w, state.dark_gpu)
        worst = max(worst, float((state.node_power_w[rack_pos] / envelope).max()))
    assert sched.jobs(), "the workloads started"
    assert worst <= 1.0, f"a rack reached {worst:.3f}x its envelope"
