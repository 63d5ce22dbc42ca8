"""Build the site's scheduler adapter from its config: the one place that picks a kind.

An explicit mapping of kinds, not import-by-name. ``sim`` has no adapter here: the demo
and the scenarios hand their simulated scheduler to
:class:`~controller.integrations.scheduler.simulated.SimulatedScheduler` themselves.
"""

from __future__ import annotations

from controller.integrations.scheduler.base import SchedulerAdapter
from controller.integrations.scheduler.kubernetes import KubeConnection, KubernetesScheduler
from controller.integrations.scheduler.mapping import HostMap
from controller.integrations.scheduler.slurm import SlurmAdapter, token_source
from controller.model.config import SchedulerConfig
from controller.model.topology import PowerTree


def host_map(cfg: SchedulerConfig, tree: PowerTree) -> HostMap:
    return HostMap(tree, cfg.host_aliases, cfg.host_pattern, cfg.host_format)


def build_adapter(cfg: SchedulerConfig, tree: PowerTree) -> SchedulerAdapter | None:
    """The adapter for ``cfg.kind``; None for ``none`` and ``sim`` (wired by the caller)."""
    if cfg.kind == "slurm":
        return SlurmAdapter(
            cfg.url or "http://127.0.0.1:6820",
            user=cfg.user,
            token=token_source(cfg.token_env, cfg.token_file),
            unix_socket=cfg.unix_socket,
        )
    if cfg.kind == "kubernetes":
        assert cfg.url is not None  # the config validator requires it
        hosts = host_map(cfg, tree)
        return KubernetesScheduler(
            KubeConnection(cfg.url, token_file=cfg.token_file, ca_file=cfg.ca_file),
            [hosts.host_of(n) for n in tree.of_kind("node")],
            job_label=cfg.job_label,
            class_label=cfg.class_label,
            gpu_resource=cfg.gpu_resource,
            requeueable_default=cfg.requeueable_default,
        )
    return None
