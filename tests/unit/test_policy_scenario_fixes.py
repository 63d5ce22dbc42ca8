"""Policy behaviour the scenario benchmark exposed, pinned down on the toy plant.

Each test is a closed loop of a policy and the toy plant of ``tests.helpers.policy_support``
(GPUs draw min(demand, limit) at once, meters read the exact sum), so what is checked is
the control law: no release on a training job's communication dips, no migration on a
meter that runs ahead of GPU telemetry for a cycle, static shares after conversion
losses, and inference bursts not stranding power.
"""

from __future__ import annotations

import numpy as np

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import Job, Migrate, Requeue
from controller.policy.baselines import static_policy
from tests.helpers.policy_support import Run, site_dict, tree_for


def test_meter_running_ahead_of_gpus_does_not_move_jobs() -> None:
    """One cycle where the rack meter reads 1.7x its rating while the GPUs report less.

    Sampling skew between meters and GPU telemetry looks like kilowatts of load no cap
    can shed; it must not be taken as a reason to migrate a job.
    """
    jobs = (Job("a", "batch", tuple(range(8)), migratable=True),)
    run = Run(tree_for(), jobs=jobs)
    run.repeat(20, lambda _: np.full(16, 300.0))
    acts = run.step(np.full(16, 300.0), node_power_w={"rack-1": 7000.0})
    acts += run.step(np.full(16, 300.0))
    assert not [a for a in acts if isinstance(a, Migrate | Requeue)]


def test_static_share_comes_after_the_configured_conversion_losses() -> None:
    site = site_dict()
    site["rows"][0]["racks"][0]["efficiency"] = {"points": [[0.5, 0.95], [1.0, 0.95]]}
    run = Run(PowerTree(parse_site(site, "lossy")), policy=static_policy)
    run.step(np.full(16, 120.0))
    # (3800 W x 0.95 at the PDU - 400 W baselines) / 8 GPUs = 401.25 W.
    assert np.all(run.limit_w == 401.0)


def test_an_inference_burst_does_not_strand_power_for_long() -> None:
    """Inference (asynchronous) bursts once, then decodes at 150 W; batch wants 480 W.

    Right after the burst the inference GPUs are planned at their peak and batch gets
    the rest; once the burst is older than the asynchronous hold, batch gets the power
    the inference GPUs no longer draw.
    """
    jobs = (
        Job("chat", "inference", (0, 1, 2, 3), synchronous=False),
        Job("b", "batch", (4, 5, 6, 7), synchronous=True),
    )
    run = Run(tree_for(), jobs=jobs)

    def demand(i: int) -> np.ndarray:
        d = np.full(16, 100.0)
        d[:4] = 500.0 if i == 4 else 150.0
        d[4:8] = 480.0
        return d

    for i in range(8):  # the burst at 2 s
        run.step(demand(i))
    after_burst = run.limit_w[4]
    for i in range(8, 22):  # to 10.5 s: older than the asynchronous hold, not the sync one
        run.step(demand(i))
    assert run.limit_w[4] > after_burst + 50.0
    assert run.limit_w[4] >= 470.0
