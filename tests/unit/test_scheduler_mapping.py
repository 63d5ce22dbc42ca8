"""Scheduler jobs onto the power tree: cap groups, host and class mapping, the fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from controller.integrations.scheduler import HostMap, SchedJob, fallback_jobs, map_class, map_jobs
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy.index import tree_index
from controller.policy.jobs import build_job_index
from tests.sites import tiny_site

CLASS_MAP = {"high": "training", "low": "batch", "prod": "inference"}


@pytest.fixture(scope="module")
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


def test_job_spanning_racks_is_one_synchronous_cap_group(tree: PowerTree) -> None:
    jobs = [
        SchedJob("100", ("rack-1-n2", "rack-2-n1"), ("high",), requeueable=True),
        SchedJob("101", ("rack-1-n1",), ("low",), gpus_per_host=2),
    ]
    out = map_jobs(jobs, tree, HostMap(tree), CLASS_MAP, tree.site.policy)
    big, small = out.jobs
    assert big.id == "100" and big.gpus == tuple(range(4, 12))
    assert big.priority_class == "training" and big.synchronous and big.migratable
    assert small.gpus == (0, 1) and small.priority_class == "batch" and not small.migratable
    # The policy's own grouping: the spanning job is one group across both racks, the
    # GPUs in no job (rack-1-n1's last two, rack-2-n2) stay per server.
    index = tree_index(tree)
    groups = build_job_index(index, out.jobs, tree.site.policy).gpu_group
    assert len(set(groups[4:12].tolist())) == 1
    assert groups[2] == groups[3] != groups[0]
    assert len(set(groups[12:16].tolist())) == 1 and groups[12] != groups[2]
    racks = {tree.gpus[g].node.rsplit("-", 1)[0] for g in big.gpus}
    assert racks == {"rack-1", "rack-2"}


def test_counts_take_free_gpus_and_explicit_indices_win(tree: PowerTree) -> None:
    jobs = [
        SchedJob("a", ("rack-2-n2",), gpus_per_host=2),
        SchedJob("b", ("rack-2-n2",), gpus_per_host=1),
        SchedJob("c", ("rack-1-n1", "rack-1-n2"), local_gpus=((3,), (0, 9))),
    ]
    out = map_jobs(jobs, tree, HostMap(tree), {}, tree.site.policy)
    assert [j.gpus for j in out.jobs] == [(12, 13), (14,), (3, 4)]


def test_only_running_jobs_draw_and_become_policy_jobs(tree: PowerTree) -> None:
    jobs = [
        SchedJob("p", ("rack-1-n1",), state="pending"),
        SchedJob("r", ("rack-1-n1",), state="running"),
    ]
    out = map_jobs(jobs, tree, HostMap(tree), {}, tree.site.policy)
    assert [j.id for j in out.jobs] == ["r"]


def test_unknown_hosts_are_ignored_with_a_log_line(
    tree: PowerTree, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [
        SchedJob("x", ("rack-1-n1", "login-7")),
        SchedJob("y", ("cpu-1", "cpu-2")),
    ]
    with caplog.at_level(logging.WARNING, logger="controller.integrations.scheduler.mapping"):
        out = map_jobs(jobs, tree, HostMap(tree), {}, tree.site.policy)
    assert [(j.id, j.gpus) for j in out.jobs] == [("x", (0, 1, 2, 3))]
    assert out.unknown_hosts == ("cpu-1", "cpu-2", "login-7")
    assert out.unplaced_jobs == ("y",)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "login-7" in line and "cpu-1" in line and "y" in line


def test_host_names_short_alias_pattern_and_reverse(tree: PowerTree) -> None:
    hosts = HostMap(
        tree,
        aliases={"gpu017": "rack-2-n2"},
        pattern=r"(?P<node>rack-\d-n\d)-ib0",
        host_format="{node}.dc.example",
    )
    assert hosts.node_of("rack-1-n1") == "rack-1-n1"
    assert hosts.node_of("rack-1-n2.dc.example") == "rack-1-n2"
    assert hosts.node_of("rack-2-n1-ib0") == "rack-2-n1"
    assert hosts.node_of("gpu017") == "rack-2-n2"
    assert hosts.node_of("rack-9-n1-ib0") is None
    assert hosts.node_of("rack-1") is None  # a rack is not a GPU server
    assert hosts.host_of("rack-2-n2") == "gpu017"
    assert hosts.hosts_under(tree, "rack-1") == ("rack-1-n1.dc.example", "rack-1-n2.dc.example")
    with pytest.raises(ValueError, match="no GPU server"):
        HostMap(tree, aliases={"h": "rack-1"})
    with pytest.raises(ValueError, match="needs a group"):
        HostMap(tree, pattern=r"rack-.*")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (("high", "low"), "training"),  # QOS mapped: wins over the partition
        (("normal", "low"), "batch"),  # QOS unmapped: the partition's mapping
        (("inference",), "inference"),  # already a controller class: no entry needed
        (("normal", "gold"), "batch"),  # unknown QOS and partition: default_class
        ((), "batch"),  # no label at all
    ],
)
def test_class_map_from_qos_or_partition(labels: tuple[str, ...], expected: str) -> None:
    names = ("critical", "training", "inference", "batch")
    assert map_class(labels, CLASS_MAP, names, "batch") == expected


def test_unknown_qos_takes_the_sites_default_class() -> None:
    data = tiny_site()
    data["policy"] = {"default_class": "inference"}
    tree = PowerTree(parse_site(data))
    out = map_jobs(
        [SchedJob("j", ("rack-1-n1",), ("mystery-qos",))],
        tree,
        HostMap(tree),
        CLASS_MAP,
        tree.site.policy,
    )
    assert out.jobs[0].priority_class == "inference"


def test_fallback_groups_every_server_as_one_unmovable_job(tree: PowerTree) -> None:
    jobs = fallback_jobs(tree, tree.site.policy)
    assert [j.id for j in jobs] == [f"server:{n}" for n in tree.of_kind("node")]
    assert [j.gpus for j in jobs] == [tuple(range(k, k + 4)) for k in (0, 4, 8, 12)]
    assert all(j.synchronous and not j.migratable and j.priority_class == "batch" for j in jobs)
    groups = build_job_index(tree_index(tree), jobs, tree.site.policy)
    assert groups.sync_gpu.all()  # capped per server as a unit, never GPU by GPU
    assert np.array_equal(groups.gpu_group, np.repeat(np.arange(4), 4))
