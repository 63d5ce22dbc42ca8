"""The Slurm adapter and the scheduler link against a REAL Slurm 22.05 on loopback.

munged, slurmctld, slurmd and slurmrestd run from a temporary directory (see
tests/fixtures/slurm.py); jobs are real ``sbatch --wrap 'sleep 300'`` batch jobs holding
fake GPU devices that Slurm hands out by index. The Slurm node ``rp-gpu1`` stands for the
tiny site's GPU server ``rack-1-n1`` (a host alias). Partitions stand for classes:
``high`` -> training, ``low`` -> batch. Every outcome is read back from Slurm
(``scontrol show``, the REST API), not taken from our own return values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from controller.integrations.scheduler import (
    ActionRefused,
    HostMap,
    JobNotFound,
    SchedulerUnavailable,
)
from controller.integrations.scheduler.runner import ActionResult, SchedulerLink
from controller.integrations.scheduler.slurm import SlurmAdapter
from controller.model.config import SchedulerConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import Migrate, Requeue, Snapshot, decide
from tests.fixtures.slurm import NODE, SlurmCluster, submit_priority_mix
from tests.helpers.ports import free_port
from tests.sites import tiny_site

pytest_plugins = ["tests.fixtures.slurm"]

CONFIG = SchedulerConfig(
    kind="slurm", url="http://127.0.0.1:6820", class_map={"high": "training", "low": "batch"}
)
SERVER = "rack-1-n1"  # GPUs 0-3 of the tiny site


@pytest.fixture(scope="module")
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's cluster, with no jobs and the node back in service after each test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
    slurm_cluster.wait_for("jobs gone", lambda: not slurm_cluster.run("squeue", "-h").strip())
    if "DRAIN" in slurm_cluster.show_node().get("State", ""):
        slurm_cluster.run("scontrol", "update", f"NodeName={NODE}", "State=RESUME")


@pytest.fixture
async def adapter(cluster: SlurmCluster) -> AsyncIterator[SlurmAdapter]:
    token = cluster.token()
    a = SlurmAdapter(cluster.rest_url, token=lambda: token, env=cluster.env)
    yield a
    await a.aclose()


def make_link(adapter: SlurmAdapter, tree: PowerTree, **kw: object) -> SchedulerLink:
    return SchedulerLink(adapter, tree, CONFIG, hosts=HostMap(tree, {NODE: SERVER}), **kw)  # type: ignore[arg-type]


async def test_jobs_are_listed_with_their_node_gpus_and_classes(
    cluster: SlurmCluster, adapter: SlurmAdapter, tree: PowerTree
) -> None:
    high, low, pinned = submit_priority_mix(cluster)
    listed = {j.id: j for j in await adapter.jobs() if j.state == "running"}
    assert set(listed) == {high, low, pinned}
    assert all(j.hosts == (NODE,) and j.state == "running" for j in listed.values())
    assert listed[high].class_labels == ("high",) and listed[low].class_labels == ("low",)
    assert (listed[high].requeueable, listed[low].requeueable) == (True, True)
    assert listed[pinned].requeueable is False
    # Slurm's GPU indices, one per job, none shared, as `scontrol show job -d` has them.
    gpus = sorted(i for j in listed.values() for i in j.local_gpus[0])
    assert gpus == [0, 1, 2, 3] and len(listed[pinned].local_gpus[0]) == 2

    link = make_link(adapter, tree)
    assert await link.refresh()
    jobs = {j.id: j for j in link.jobs_for_policy()}
    assert {j: (v.priority_class, v.migratable) for j, v in jobs.items()} == {
        high: ("training", True),
        low: ("batch", True),
        pinned: ("batch", False),
    }
    first, stop = tree.gpu_range(SERVER)
    assert sorted(g for j in jobs.values() for g in j.gpus) == list(range(first, stop))
    assert not link.status().fallback and link.status().alarm is None


async def test_overload_requeues_exactly_the_lowest_priority_requeueable_job_and_drains(
    cluster: SlurmCluster, adapter: SlurmAdapter, tree: PowerTree
) -> None:
    """The real policy on a rack whose meter reads more than GPUs at floor could ever clear.

    Of three jobs on the node, the pinned one (low, not requeueable) must stay and the high
    one outranks the other low one: Slurm must show exactly that low job requeued, the node
    drained with our reason, and the node back in service once headroom returns.
    """
    high, low, pinned = submit_priority_mix(cluster)
    headroom_w = {"rack-1": -5000.0}
    now = [0.0]
    results: list[ActionResult] = []
    link = make_link(
        adapter,
        tree,
        headroom_w=headroom_w.get,
        on_result=results.append,
        clock=lambda: now[0],
        resume_hold_s=60.0,
    )
    assert await link.refresh()

    state = None
    escalations: list[Migrate | Requeue] = []
    meters = {"rack-1": 12000.0, "rack-2": 7500.0, "feed": 17000.0}
    for k in range(20):  # sustained: the same overload, cycle after cycle
        snap = Snapshot.build(
            tree,
            k * 0.5,
            gpu_power_w=[500.0] * len(tree.gpus),
            gpu_limit_w=[500.0] * len(tree.gpus),
            node_power_w=meters,
            jobs=link.jobs_for_policy(),
        )
        actions, state = decide(snap, tree, state)
        for action in actions:
            if isinstance(action, Migrate | Requeue):
                escalations.append(action)
                assert link.submit_action(action)
                assert not link.submit_action(action)  # the same job is not queued twice
    assert [(a.job_id, a.node_id) for a in escalations] == [(low, "rack-1")]
    await link.drain_queue()

    assert [(r.kind, r.target, r.outcome) for r in results] == [
        ("requeue", low, "requeued"),
        ("drain", "rack-1", "drained"),
    ]
    # Slurm kills the batch step first (COMPLETING), then queues the job again.
    cluster.wait_for(f"job {low} pending", lambda: cluster.job_state(low) == "PENDING")
    assert cluster.show_job(low)["Restarts"] == "1"
    assert cluster.job_state(high) == "RUNNING" and cluster.job_state(pinned) == "RUNNING"
    admin = cluster.run("scontrol", "show", "job", low)
    assert "AdminComment=rackpower: rack-1:" in admin  # the note says why
    node = (await adapter.nodes())[NODE]
    assert "DRAIN" in " ".join([node["state"], *node["state_flags"]]).upper()
    assert node["reason"].startswith("rackpower: rack-1:")
    assert link.status().drained == ("rack-1",)

    # Headroom back, but not for long enough: still drained.
    headroom_w["rack-1"] = 800.0
    link.check_drains()
    now[0] = 59.0
    link.check_drains()
    await link.drain_queue()
    assert "DRAIN" in cluster.show_node()["State"]
    # A dip restarts the wait; then a full minute of headroom resumes the node.
    headroom_w["rack-1"] = -10.0
    now[0] = 61.0
    link.check_drains()
    headroom_w["rack-1"] = 800.0
    for t in (62.0, 100.0, 122.0):
        now[0] = t
        link.check_drains()
    await link.drain_queue()
    assert results[-1].kind == "resume" and results[-1].outcome == "resumed"
    assert "DRAIN" not in cluster.show_node()["State"]
    assert link.status().drained == ()
    # The requeued job is still queued (Slurm holds a requeued job back by its BeginTime).
    assert cluster.job_state(low) == "PENDING"


async def test_local_auth_over_a_unix_socket_lists_the_same_jobs(cluster: SlurmCluster) -> None:
    jid = cluster.sbatch("--wrap", "sleep 300", "-p", "high", "--gres=gpu:2")
    cluster.wait_for("running", lambda: cluster.job_state(jid) == "RUNNING")
    local = SlurmAdapter(unix_socket=str(cluster.rest_socket), env=cluster.env)
    try:
        (job,) = [j for j in await local.jobs() if j.state == "running"]
        assert (job.id, job.hosts, job.class_labels) == (jid, (NODE,), ("high",))
        assert len(job.local_gpus[0]) == 2
    finally:
        await local.aclose()


async def test_migrate_requeues_away_from_the_hosts(
    cluster: SlurmCluster, adapter: SlurmAdapter
) -> None:
    jid = cluster.sbatch("--wrap", "sleep 300", "--requeue", "-p", "low", "--gres=gpu:1")
    cluster.wait_for("running", lambda: cluster.job_state(jid) == "RUNNING")
    outcome = await adapter.migrate(jid, [NODE, "not-a-slurm-node"], "test: rack over")
    assert outcome == "requeued"
    cluster.wait_for(f"job {jid} pending", lambda: cluster.job_state(jid) == "PENDING")
    shown = cluster.show_job(jid)
    assert shown["ExcNodeList"] == NODE and shown["Restarts"] == "1"
    await asyncio.sleep(2)  # the only node is excluded: it must not start again
    assert cluster.job_state(jid) == "PENDING"
    assert cluster.show_job(jid)["Reason"] != "JobHeldAdmin"  # released, not left held


async def test_refusals_are_told_apart_from_an_unreachable_scheduler(
    cluster: SlurmCluster, adapter: SlurmAdapter
) -> None:
    pinned = cluster.sbatch("--wrap", "sleep 300", "--no-requeue", "-p", "low")
    cluster.wait_for("running", lambda: cluster.job_state(pinned) == "RUNNING")
    with pytest.raises(ActionRefused, match="presently disabled") as refused:
        await adapter.requeue(pinned, "test")
    assert not isinstance(refused.value, JobNotFound)
    assert cluster.job_state(pinned) == "RUNNING"
    with pytest.raises(JobNotFound, match="Invalid job id"):
        await adapter.requeue("999999", "test")
    with pytest.raises(ActionRefused, match=r"none of .* is a Slurm node"):
        await adapter.drain(["rack-2-n1"], "test")
    await adapter.resume([NODE])  # not drained: nothing to do, no error
    assert cluster.show_node()["State"].startswith(("IDLE", "MIXED", "ALLOCATED"))

    closed = SlurmAdapter(f"http://127.0.0.1:{free_port()}", token="x", timeout_s=1.0)
    with pytest.raises(SchedulerUnavailable, match="slurmrestd"):
        await closed.jobs()
    await closed.aclose()
    bad_token = SlurmAdapter(cluster.rest_url, token="not-a-jwt", env=cluster.env)
    with pytest.raises(SchedulerUnavailable):
        await bad_token.jobs()
    await bad_token.aclose()
    no_controller = SlurmAdapter(cluster.rest_url, env={"SLURM_CONF": "/nonexistent.conf"})
    with pytest.raises(SchedulerUnavailable):
        await no_controller.requeue(pinned, "test")
    await no_controller.aclose()


async def test_link_serves_the_last_good_list_then_falls_back_with_an_alarm(
    cluster: SlurmCluster, tree: PowerTree
) -> None:
    """The token is withdrawn (slurmrestd answers 401): the link keeps the last good jobs
    for ``stale_after_s``, raises the alarm at once, then hands the policy per-server
    groups; a good poll ends both."""
    jid = cluster.sbatch("--wrap", "sleep 300", "-p", "high", "--gres=gpu:4")
    cluster.wait_for("running", lambda: cluster.job_state(jid) == "RUNNING")
    token = [cluster.token()]
    adapter = SlurmAdapter(cluster.rest_url, token=lambda: token[0], env=cluster.env)
    now = [0.0]
    link = make_link(adapter, tree, clock=lambda: now[0], stale_after_s=30.0)
    try:
        assert link.jobs_for_policy()[0].id == f"server:{SERVER}"  # not polled yet
        assert await link.refresh()
        assert [j.id for j in link.jobs_for_policy()] == [jid]

        good, token[0] = token[0], "expired"
        now[0] = 10.0
        assert not await link.refresh()
        status = link.status()
        assert status.alarm is not None and "slurm" in status.alarm
        assert [j.id for j in link.jobs_for_policy()] == [jid] and not status.fallback
        now[0] = 31.0
        jobs = link.jobs_for_policy()
        assert link.status().fallback
        assert [j.id for j in jobs] == [f"server:{n}" for n in tree.of_kind("node")]
        assert not any(j.migratable for j in jobs)

        token[0] = good
        assert await link.refresh()
        assert [j.id for j in link.jobs_for_policy()] == [jid]
        assert link.status().alarm is None and not link.status().fallback
    finally:
        await adapter.aclose()


async def test_run_polls_in_the_background_and_the_cycle_never_waits(
    cluster: SlurmCluster, adapter: SlurmAdapter, tree: PowerTree
) -> None:
    link = make_link(adapter, tree, poll_s=0.2)
    task = asyncio.create_task(link.run())
    try:
        jid = cluster.sbatch("--wrap", "sleep 300", "-p", "low", "--gres=gpu:2")
        for _ in range(150):  # reading is a plain call, whatever the poller is doing
            if [j.id for j in link.jobs_for_policy()] == [jid]:
                break
            await asyncio.sleep(0.1)
        assert [j.id for j in link.jobs_for_policy()] == [jid]
        assert link.jobs_for_policy()[0].priority_class == "batch"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_drain_left_by_an_earlier_run_is_found_and_resumed(
    cluster: SlurmCluster, adapter: SlurmAdapter, tree: PowerTree
) -> None:
    """A controller restarted while it had the node drained: the new link finds the drain
    by its reason and resumes the node once the rack has headroom. An operator's drain
    (any other reason) is not ours to list or to undo."""
    cluster.run("scontrol", "update", f"NodeName={NODE}", "State=DRAIN", "Reason=maintenance")
    assert await adapter.drained() == {}
    ours = "rackpower: rack-1: 12.0 kW even with every GPU at its floor"
    cluster.run("scontrol", "update", f"NodeName={NODE}", "State=DRAIN", f"Reason={ours}")
    assert await adapter.drained() == {NODE: ours}
    results: list[ActionResult] = []
    link = make_link(
        adapter,
        tree,
        headroom_w={"rack-1": 500.0}.get,
        on_result=results.append,
        resume_hold_s=0.0,
    )
    assert await link.refresh()
    await link.adopt_drains()
    assert link.status().drained == ("rack-1",)
    link.check_drains()
    await link.drain_queue()
    assert [(r.kind, r.target, r.outcome) for r in results] == [
        ("drain", "rack-1", "adopted"),
        ("resume", "rack-1", "resumed"),
    ]
    assert "DRAIN" not in cluster.show_node()["State"]
    assert await adapter.drained() == {}
