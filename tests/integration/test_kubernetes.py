"""The Kubernetes adapter against a fake API server on loopback.

No real Kubernetes API server can run here (it needs etcd, a control plane and
certificates that neither this machine nor CI has), so these tests talk HTTP to
:mod:`tests.fixtures.fake_kube`, a small server that speaks the real paths and payload
shapes (PodList, Pod, policy/v1 Eviction, Node, Event, Status). Every test reads back the
fake's state (pods left, nodes' ``spec.unschedulable``, events, the requests it got)
rather than trusting the adapter's return values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.integrations.scheduler.base import (
    ActionRefused,
    JobNotFound,
    SchedJob,
    SchedulerAdapter,
    SchedulerUnavailable,
)
from controller.integrations.scheduler.kubernetes import (
    DRAIN_ANNOTATION,
    KubeConnection,
    KubernetesScheduler,
)
from controller.integrations.scheduler.mapping import HostMap, map_jobs
from controller.model.config import PolicyConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.fixtures.fake_kube import FakeKube, make_pod, serve_fake_kube
from tests.sites import tiny_site

SERVERS = ("rack-1-n1", "rack-1-n2", "rack-2-n1", "rack-2-n2")
REQUEUE = {"rackpower.io/requeueable": "true"}


def cluster(kube: FakeKube) -> None:
    """Two racks of two 4-GPU servers (tests/sites.py tiny site) and some workloads."""
    for name in (*SERVERS, "cpu-only-node"):
        kube.add_node(name)
    # A training job across racks: one 4-GPU pod per server, plus its GPU-less launcher.
    for i, node in enumerate(("rack-1-n1", "rack-2-n1")):
        kube.add_pod(
            make_pod(
                f"train-a-{i}",
                node,
                namespace="ml",
                labels={"job-name": "train-a", **REQUEUE},
                priority_class="high-priority",
                gpus=4,
            )
        )
    kube.add_pod(
        make_pod("train-a-launcher", "rack-1-n2", namespace="ml", labels={"job-name": "train-a"})
    )
    # A small batch job: 2 GPUs on one server, class given by a label.
    kube.add_pod(
        make_pod(
            "batch-b-0",
            "rack-1-n2",
            namespace="ml",
            labels={"job-name": "batch-b", "rackpower.io/class": "batch", **REQUEUE},
            priority_class="low",
            gpus=2,
        )
    )
    # An inference pod of a Deployment: no job label, asynchronous, not requeueable.
    kube.add_pod(
        make_pod(
            "infer-x-5d8f",
            "rack-2-n2",
            namespace="serve",
            labels={"app": "infer-x", "rackpower.io/synchronous": "false"},
            priority_class="inference",
            gpus=1,
        )
    )
    # Finished, and on a node the power tree does not have: neither is listed.
    kube.add_pod(
        make_pod("done-0", "rack-2-n2", labels={"job-name": "done"}, gpus=4, phase="Succeeded")
    )
    kube.add_pod(make_pod("far-0", "cpu-only-node", labels={"job-name": "far"}, gpus=1))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKube, KubeConnection]]:
    token = tmp_path / "token"
    kube = FakeKube()
    token.write_text(kube.token + "\n")
    cluster(kube)
    with serve_fake_kube(kube) as (k, url):
        yield k, KubeConnection(api_url=url, token_file=token, timeout_s=5)


@pytest.fixture
async def adapter(fake: tuple[FakeKube, KubeConnection]) -> AsyncIterator[KubernetesScheduler]:
    k8s = KubernetesScheduler(fake[1], SERVERS, class_label="rackpower.io/class")
    try:
        yield k8s
    finally:
        await k8s.aclose()


def evictions(kube: FakeKube) -> list[tuple[str, dict[str, object]]]:
    return [(r.path, r.body) for r in kube.requests if r.path.endswith("/eviction")]


async def test_is_a_scheduler_adapter(adapter: KubernetesScheduler) -> None:
    assert isinstance(adapter, SchedulerAdapter)
    assert adapter.name == "kubernetes"


async def test_jobs_from_pods_per_node_with_hosts_and_classes(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    jobs = {j.id: j for j in await adapter.jobs()}
    assert jobs == {
        "ml/train-a": SchedJob(
            id="ml/train-a",
            hosts=("rack-1-n1", "rack-2-n1"),
            class_labels=("high-priority",),
            gpus_per_host=4,
            requeueable=True,
            synchronous=True,
            state="running",
            name="train-a-0",
        ),
        "ml/batch-b": SchedJob(
            id="ml/batch-b",
            hosts=("rack-1-n2",),
            class_labels=("batch", "low"),
            gpus_per_host=2,
            requeueable=True,
            synchronous=True,
            state="running",
            name="batch-b-0",
        ),
        "serve/pod:infer-x-5d8f": SchedJob(
            id="serve/pod:infer-x-5d8f",
            hosts=("rack-2-n2",),
            class_labels=("inference",),
            gpus_per_host=1,
            requeueable=False,
            synchronous=False,
            state="running",
            name="infer-x-5d8f",
        ),
    }
    # One list per server through the field selector, never a cluster-wide list.
    selectors = sorted(r.query["fieldSelector"] for r in kube.requests if r.path == "/api/v1/pods")
    assert selectors == [f"spec.nodeName={s}" for s in SERVERS]
    assert all("labelSelector" not in r.query for r in kube.requests)


async def test_jobs_map_onto_the_tree_one_job_across_racks(adapter: KubernetesScheduler) -> None:
    tree = PowerTree(parse_site(tiny_site()))
    policy = PolicyConfig()
    class_map = {"high-priority": "training", "low": "batch"}
    mapped = map_jobs(await adapter.jobs(), tree, HostMap(tree), class_map, policy)
    by_id = {j.id: j for j in mapped.jobs}
    # tiny site: 4 GPUs per server in tree order: r1n1 0-3, r1n2 4-7, r2n1 8-11, r2n2 12-15.
    assert by_id["ml/train-a"].gpus == (0, 1, 2, 3, 8, 9, 10, 11)
    assert by_id["ml/train-a"].priority_class == "training"
    assert by_id["ml/train-a"].migratable
    assert (by_id["ml/batch-b"].gpus, by_id["ml/batch-b"].priority_class) == ((4, 5), "batch")
    infer = by_id["serve/pod:infer-x-5d8f"]
    assert (infer.gpus, infer.priority_class, infer.synchronous) == ((12,), "inference", False)
    assert not infer.migratable


async def test_requeue_evicts_exactly_the_jobs_pods(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    await adapter.requeue("ml/train-a", "rack-1 over its envelope at the GPU floor")
    assert sorted(kube.evicted) == [
        ("ml", "train-a-0"),
        ("ml", "train-a-1"),
        ("ml", "train-a-launcher"),
    ]
    left = sorted(name for _, name in kube.pods)
    assert left == ["batch-b-0", "done-0", "far-0", "infer-x-5d8f"]
    for path, body in evictions(kube):
        name = path.split("/")[-2]
        assert path == f"/api/v1/namespaces/ml/pods/{name}/eviction"
        assert body == {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": "ml"},
        }
    # The job's pods were found by its label in its namespace.
    assert any(r.query.get("labelSelector") == "job-name=train-a" for r in kube.requests)
    assert {j.id for j in await adapter.jobs()} == {"ml/batch-b", "serve/pod:infer-x-5d8f"}


async def test_pdb_429_is_a_refusal_and_evicts_nothing(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    kube.pdb_protected |= {("ml", "train-a-0"), ("ml", "train-a-1"), ("ml", "train-a-launcher")}
    with pytest.raises(ActionRefused) as info:
        await adapter.requeue("ml/train-a", "rack-1 over")
    assert "would violate the pod's disruption budget" in info.value.reason
    assert "nothing evicted" in info.value.reason
    assert not isinstance(info.value, JobNotFound)
    assert kube.evicted == []
    assert len(evictions(kube)) == 1  # stopped at the first 429: no blind retries
    assert {("ml", "train-a-0"), ("ml", "train-a-1")} <= set(kube.pods)


async def test_migrate_is_requeue_away(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    assert await adapter.migrate("ml/batch-b", ["rack-1-n2"], "rack-1 over") == "requeued"
    assert kube.evicted == [("ml", "batch-b-0")]


async def test_refusals_without_eviction(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    with pytest.raises(ActionRefused, match="not requeueable"):
        await adapter.requeue("serve/pod:infer-x-5d8f", "rack-2 over")
    with pytest.raises(JobNotFound):
        await adapter.requeue("ml/no-such-job", "x")
    with pytest.raises(JobNotFound):
        await adapter.requeue("garbage", "x")
    assert evictions(kube) == [] and kube.evicted == []


async def test_cordon_then_uncordon_read_back(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    kube.nodes["rack-2-n2"]["spec"]["unschedulable"] = True  # an operator's cordon
    await adapter.drain(["rack-1-n1", "rack-1-n2"], "rack-1 above its envelope")
    assert [kube.unschedulable(n) for n in SERVERS] == [True, True, False, True]
    annotations = kube.nodes["rack-1-n1"]["metadata"]["annotations"]
    assert annotations[DRAIN_ANNOTATION] == "rack-1 above its envelope"
    patches = [r for r in kube.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/merge-patch+json"}
    assert {r.path for r in patches} == {"/api/v1/nodes/rack-1-n1", "/api/v1/nodes/rack-1-n2"}
    assert {j.id for j in await adapter.jobs()} == {
        "ml/train-a",
        "ml/batch-b",
        "serve/pod:infer-x-5d8f",
    }

    await adapter.resume(["rack-1-n1", "rack-1-n2", "rack-2-n2"])
    assert [kube.unschedulable(n) for n in SERVERS] == [False, False, False, True]
    assert DRAIN_ANNOTATION not in kube.nodes["rack-1-n1"]["metadata"]["annotations"]
    # rackpower did not cordon rack-2-n2, so it left it cordoned.
    assert [r.path for r in kube.requests if r.method == "PATCH"][-2:] == [
        "/api/v1/nodes/rack-1-n1",
        "/api/v1/nodes/rack-1-n2",
    ]


async def test_drained_lists_our_cordons_on_our_nodes_only(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    """What a restarted controller reads to take over its drains: nodes of its tree it
    cordoned (the annotation), not an operator's cordon, not a node outside its tree."""
    kube, _ = fake
    await adapter.drain(["rack-1-n1"], "rackpower: rack-1: over its envelope")
    kube.nodes["rack-2-n2"]["spec"]["unschedulable"] = True  # an operator's cordon
    kube.nodes["cpu-only-node"]["metadata"]["annotations"][DRAIN_ANNOTATION] = "rackpower: x"
    assert await adapter.drained() == {"rack-1-n1": "rackpower: rack-1: over its envelope"}
    await adapter.resume(["rack-1-n1"])
    assert await adapter.drained() == {}


async def test_note_is_an_event_on_each_pod(
    adapter: KubernetesScheduler, fake: tuple[FakeKube, KubeConnection]
) -> None:
    kube, _ = fake
    await adapter.note("ml/train-a", "capped to 350 W per GPU: rack-1 above 97 % of 7 kW")
    assert sorted(
        (e["involvedObject"]["kind"], e["involvedObject"]["name"], e["metadata"]["namespace"])
        for e in kube.events
    ) == [("Pod", "train-a-0", "ml"), ("Pod", "train-a-1", "ml"), ("Pod", "train-a-launcher", "ml")]
    assert {e["message"] for e in kube.events} == {
        "capped to 350 W per GPU: rack-1 above 97 % of 7 kW"
    }
    assert {e["source"]["component"] for e in kube.events} == {"rackpower"}
    uid = kube.pods[("ml", "train-a-0")]["metadata"]["uid"]
    assert uid in {e["involvedObject"]["uid"] for e in kube.events}


async def test_unavailable_api_is_reported_as_such(
    fake: tuple[FakeKube, KubeConnection], tmp_path: Path
) -> None:
    kube, conn = fake
    kube.fail_all_with = 503
    k8s = KubernetesScheduler(conn, SERVERS)
    try:
        with pytest.raises(SchedulerUnavailable, match="503"):
            await k8s.jobs()
        kube.fail_all_with = None
        (tmp_path / "token").write_text("rotated-but-wrong")  # read on every request
        with pytest.raises(SchedulerUnavailable, match="401"):
            await k8s.drain(["rack-1-n1"], "x")
        assert not kube.unschedulable("rack-1-n1")
    finally:
        await k8s.aclose()
    dead = KubernetesScheduler(KubeConnection(api_url="http://127.0.0.1:9", timeout_s=2), SERVERS)
    try:
        with pytest.raises(SchedulerUnavailable, match="kubernetes: GET /api/v1/pods"):
            await dead.jobs()
    finally:
        await dead.aclose()


def test_in_cluster_connection() -> None:
    conn = KubeConnection.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert conn.api_url == "https://10.96.0.1:443"
    assert conn.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert conn.ca_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        KubeConnection.in_cluster({})
