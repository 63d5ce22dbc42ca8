"""Scheduler jobs -> policy jobs: host names to GPU servers, classes to priority classes.

Pure (no I/O, no clock) so the mapping is unit-tested with tables and the link can rerun
it whenever the job list changes. The policy caps a synchronous job as one unit wherever
its GPUs are, so a job spanning racks becomes ONE policy job with GPUs under several
racks; GPUs in no job are left out (the policy groups them per server by itself).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controller.integrations.scheduler.base import SchedJob
from controller.model.config import PolicyConfig
from controller.model.topology import PowerTree
from controller.policy.types import Job

log = logging.getLogger(__name__)

#: Prefix of the per-server pseudo-jobs of :func:`fallback_jobs` (never sent to a scheduler).
FALLBACK_PREFIX = "server:"


class HostMap:
    """Scheduler host name <-> GPU server node id.

    By default a host is the server with the same id, or with the host's short name
    (``r1-n1.cluster.local`` -> ``r1-n1``). ``aliases`` names exceptions
    (``{"gpu017": "rack-1-n1"}``); ``pattern`` is a regex whose group ``node`` (or first
    group) extracts the node id (``r"(?P<node>.+)-ib"``). ``host_format`` builds the
    scheduler's name for a server in the other direction (``"{node}.cluster.local"``);
    without it a server is named by its alias or its id.
    """

    def __init__(
        self,
        tree: PowerTree,
        aliases: Mapping[str, str] | None = None,
        pattern: str | None = None,
        host_format: str | None = None,
    ) -> None:
        self._servers = frozenset(tree.of_kind("node"))
        self.aliases: Mapping[str, str] = MappingProxyType(dict(aliases or {}))
        for host, node in self.aliases.items():
            if node not in self._servers:
                raise ValueError(f"host alias {host!r} -> {node!r}: no GPU server {node!r}")
        self._pattern = re.compile(pattern) if pattern else None
        if self._pattern is not None and self._pattern.groups == 0:
            raise ValueError(f"host pattern {pattern!r} needs a group for the node id")
        self._host_format = host_format
        self._reverse = {node: host for host, node in self.aliases.items()}

    def node_of(self, host: str) -> str | None:
        """The GPU server this host is, or None when the tree has no such server."""
        alias = self.aliases.get(host)
        if alias is not None:
            return alias
        if self._pattern is not None:
            m = self._pattern.fullmatch(host)
            if m is not None:
                node = m.group("node") if "node" in self._pattern.groupindex else m.group(1)
                return node if node in self._servers else None
        if host in self._servers:
            return host
        short = host.split(".", 1)[0]
        return short if short in self._servers else None

    def host_of(self, node_id: str) -> str:
        """The scheduler's name for a GPU server (for drain/resume)."""
        alias = self._reverse.get(node_id)
        if alias is not None:
            return alias
        if self._host_format is not None:
            return self._host_format.format(node=node_id)
        return node_id

    def hosts_under(self, tree: PowerTree, node_id: str) -> tuple[str, ...]:
        """Scheduler names of every GPU server at or under ``node_id`` (a rack, a row)."""
        return tuple(self.host_of(n) for n in tree.subtree(node_id) if n in self._servers)


def map_class(
    labels: Iterable[str],
    class_map: Mapping[str, str],
    class_names: Sequence[str],
    default_class: str,
) -> str:
    """The controller's class for a job's scheduler labels.

    The first label the config maps wins; then a label that already is a controller class
    (a QOS named ``training`` needs no entry); else ``default_class``. Labels are tried
    in the adapter's order (Slurm: QOS before partition).
    """
    labels = tuple(labels)
    for label in labels:
        mapped = class_map.get(label)
        if mapped is not None and mapped in class_names:
            return mapped
    for label in labels:
        if label in class_names:
            return label
    return default_class


@dataclass(frozen=True)
class JobMapping:
    """The policy's jobs, and what could not be mapped (for logs and the API)."""

    jobs: tuple[Job, ...]
    unknown_hosts: tuple[str, ...] = ()
    unplaced_jobs: tuple[str, ...] = ()  # running, but on no server the tree knows


def map_jobs(
    sched_jobs: Iterable[SchedJob],
    tree: PowerTree,
    hosts: HostMap,
    class_map: Mapping[str, str],
    policy: PolicyConfig,
) -> JobMapping:
    """Running scheduler jobs as policy jobs, GPU indices into ``tree.gpus``.

    A host the tree does not know is ignored (logged once per call): a scheduler often
    manages more machines than one controller's power tree. A job that holds a count of
    GPUs on a server without saying which gets the lowest-numbered ones not taken by an
    earlier job in the list (the policy only needs the grouping to be consistent).
    """
    names = tuple(c.name for c in policy.priority_classes)
    taken: dict[str, set[int]] = {}
    unknown: dict[str, None] = {}
    unplaced: list[str] = []
    out: list[Job] = []
    for sj in sched_jobs:
        if sj.state != "running":
            continue
        gpus: list[int] = []
        for k, host in enumerate(sj.hosts):
            node = hosts.node_of(host)
            if node is None:
                unknown[host] = None
                continue
            first, stop = tree.gpu_range(node)
            used = taken.setdefault(node, set())
            if k < len(sj.local_gpus):
                local = [first + i for i in sj.local_gpus[k] if 0 <= i < stop - first]
            elif sj.gpus_per_host is not None:
                free = [g for g in range(first, stop) if g not in used]
                local = free[: sj.gpus_per_host]
            else:
                local = list(range(first, stop))
            used.update(local)
            gpus.extend(local)
        if not gpus:
            unplaced.append(sj.id)
            continue
        out.append(
            Job(
                id=sj.id,
                priority_class=map_class(sj.class_labels, class_map, names, policy.default_class),
                gpus=tuple(sorted(set(gpus))),
                synchronous=sj.synchronous,
                migratable=sj.requeueable or sj.migratable,
            )
        )
    if unknown:
        log.warning(
            "scheduler hosts not in the power tree, ignored: %s (jobs on them: %s)",
            ", ".join(sorted(unknown)),
            ", ".join(unplaced) or "none wholly",
        )
    return JobMapping(tuple(out), tuple(sorted(unknown)), tuple(unplaced))


def fallback_jobs(tree: PowerTree, policy: PolicyConfig) -> tuple[Job, ...]:
    """Without a scheduler: each GPU server's GPUs as one synchronous, unmovable group.

    We cannot know which jobs run where, so assume the worst for throughput: whatever
    runs on a server may be one synchronous job, capped as a unit (never GPU by GPU), in
    the default class. Nothing is migratable, so escalation stays quiet until the
    scheduler is back. The caller logs and raises the alarm; ids start with
    :data:`FALLBACK_PREFIX`.
    """
    out: list[Job] = []
    for node in tree.of_kind("node"):
        first, stop = tree.gpu_range(node)
        if stop > first:
            out.append(
                Job(
                    id=FALLBACK_PREFIX + node,
                    priority_class=policy.default_class,
                    gpus=tuple(range(first, stop)),
                    synchronous=True,
                    migratable=False,
                )
            )
    return tuple(out)
