"""Run a controller as a service: every piece a named task in one TaskGroup.

Tasks: the control cycle, the device pollers, and one task per integration
(controller/core/integration.py): the agent link and its telemetry reader, the BMS link,
the TSDB writer, the HTTP API, the scheduler link, the loop's metrics and the systemd
watchdog. Each cycle's result is handed to every integration's ``publish``, isolated: a
failing one is counted and logged and never stops the others or the next cycle's leases.
An integration that fails is retried with backoff by its own loop and never stops the
cycle; only the cycle's own death (or a signal) ends the service.

Signals: SIGTERM/SIGINT stop acting (no more leases: the agents' leases run out into
their failsafe cap), publish ``offline``, flush what is buffered and exit 0. SIGHUP
reloads the config, validated before it replaces the running one; a bad file is refused
with a log line and an audit event, and the old config keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controller.agentlink.msgauth import KeyStore
from controller.agentlink.transport import ControllerLink, MqttControllerLink
from controller.core.audit import AuditLog
from controller.core.builtin import AgentLinkIntegration, LoopMetrics, Watchdog
from controller.core.controller import Controller, Mode
from controller.core.cycle import run_cycle
from controller.core.integration import Integration, TaskIntegration, deliver
from controller.core.metrics import Metrics
from controller.core.setpoints import Ack, Command, ModeSwitch
from controller.integrations.api.app import ApiServer, create_app
from controller.integrations.api.integration import ApiIntegration
from controller.integrations.bms.bridge import BmsLink
from controller.integrations.bms.integration import BmsIntegration
from controller.integrations.scheduler.attach import attach_scheduler
from controller.integrations.scheduler.factory import build_adapter
from controller.integrations.tsdb.integration import TsdbIntegration
from controller.integrations.tsdb.writer import TsdbWriter
from controller.model.config import ConfigError, Site, agent_auth_problems
from controller.model.devices import polled_device_params
from controller.model.loader import load_site
from controller.support.mqtt import quiet_aiomqtt_close_race
from controller.support.sdnotify import Notifier
from drivers.base import DeviceStats, PollGroup, PollSettings
from drivers.registry import build_pollables

log = logging.getLogger(__name__)


@dataclass
class ServiceOptions:
    mode: Mode = "enforce"
    controller_id: str | None = None  # what the agents obey (default: rackpower-<site>)
    config_path: Path | None = None  # for SIGHUP reloads
    api_port: int | None = None  # overrides the config (0 = any free port)
    api: bool = True
    allow_unauthenticated: bool = False
    audit_path: Path | None = None
    link: ControllerLink | None = None  # the demo passes its in-process link
    install_signals: bool = True
    on_ready: Callable[[Controller, str | None], None] | None = None
    # More integrations to run beside the configured ones (the demo's agents, its reporter).
    extra: Sequence[Integration] = ()
    # Shorthand for plain tasks (tests, benchmarks): each runs as a TaskIntegration.
    extra_tasks: Mapping[str, Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=dict)


def _device_health(group: PollGroup, now: Callable[[], float], stale: Mapping[str, float]):  # type: ignore[no-untyped-def]
    def health() -> dict[str, tuple[bool, str | None]]:
        t = now()
        out: dict[str, tuple[bool, str | None]] = {}
        stats: dict[str, DeviceStats] = group.stats()
        for dev, st in stats.items():
            last = st.last_good_s
            out[dev] = (last is None or t - last > stale.get(dev, 3.0), st.last_error)
        return out

    return health


def _agent_link(site: Site, options: ServiceOptions) -> ControllerLink | None:
    """The demo's link, or MQTT with the agents' keys; refuses to start without a key."""
    integrations = site.integrations
    link = options.link
    if link is None and integrations.mqtt is not None:
        # load_site refuses agents on MQTT without agent_auth; a Site put together in
        # code has not been through it, so ask the same rule again: no key, no start.
        for problem in agent_auth_problems(site.spec, site.nodes):
            raise ValueError(f"{site.source}: {problem.path}: {problem.message}")
        auth = integrations.agent_auth
        keys: KeyStore | None = None
        if auth is not None and auth.keys_dir is not None:
            # A directory missing, unreadable or open to others stops the start here.
            keys = KeyStore(auth.keys_dir, check_every_s=auth.check_every_s)
        link = MqttControllerLink(integrations.mqtt, site.name, keys=keys)
    if isinstance(link, MqttControllerLink) and link.keys is None:
        log.warning(
            "AGENT LINK UNAUTHENTICATED (integrations.agent_auth.allow_unsigned): leases"
            " go out unsigned and any telemetry is believed, so anyone who can publish on"
            " the broker can raise or lower GPU caps and fake readings; set"
            " integrations.agent_auth.keys_dir instead (docs/agent-link.md)"
        )
    return link


def _check_keys(keys: KeyStore | None, controller: Controller) -> None:
    missing = keys.missing(sorted(controller.agents)) if keys is not None else []
    if keys is not None and missing:
        log.error(
            "no usable agent key for %d of %d agents (they get no lease, their telemetry"
            " is refused): %s%s",
            len(missing),
            len(controller.agents),
            ", ".join(missing[:5]),
            " ..." if len(missing) > 5 else "",
        )
        log.error("first key problem: %s", keys.problem(missing[0]))


def _bms(site: Site, controller: Controller) -> BmsIntegration | None:
    """The BMS link: commands in (audited), telemetry and alarms out."""
    mqtt = site.integrations.mqtt
    if mqtt is None:
        return None
    audit = controller.audit

    def on_command(cmd: Command) -> None:
        if isinstance(cmd, ModeSwitch):
            controller.apply_mode_command(cmd)
        audit.record(
            f"command:{cmd.type}",
            f"BMS command {cmd.command_id} accepted: {cmd.model_dump_json()}",
            now_s=time.time(),
        )

    def on_rejected(ack: Ack) -> None:
        audit.record(
            "command_rejected",
            f"BMS command {ack.command_id} ({ack.type}) rejected: {ack.reason}",
            now_s=time.time(),
        )

    frames: list[BmsIntegration] = []
    link = BmsLink(
        mqtt,
        controller.tree,
        telemetry=lambda: frames[0].frames(),
        on_command=on_command,
        on_rejected=on_rejected,
        overrides=controller.overrides,
    )
    controller.metrics.watch_bms(lambda: asdict(link.stats()))
    frames.append(BmsIntegration(link))
    return frames[0]


def _api(site: Site, options: ServiceOptions, controller: Controller) -> ApiServer | None:
    if not options.api:
        return None
    cfg = site.integrations.api
    app = create_app(
        controller,
        cfg,
        reservations=controller.reservations,
        audit=controller.audit,
        metrics=controller.metrics,
        allow_unauthenticated=options.allow_unauthenticated,
    )
    api = ApiServer(
        app, host=cfg.host, port=cfg.port if options.api_port is None else options.api_port
    )
    api.bind()
    return api


def build_integrations(
    site: Site,
    options: ServiceOptions,
    controller: Controller,
    group: PollGroup,
    notifier: Notifier,
) -> list[Integration]:
    """Every integration the config asks for, in shutdown order (the BMS first, so its
    ``offline`` goes out while the rest flush; the agent link last)."""
    out: list[Integration] = []
    if (bms := _bms(site, controller)) is not None:
        out.append(bms)
    if site.integrations.influx is not None:
        out.append(
            TsdbIntegration(TsdbWriter(site.integrations.influx), site.name, controller.metrics)
        )
    if (api := _api(site, options, controller)) is not None:
        out.append(ApiIntegration(api))
    adapter = build_adapter(site.integrations.scheduler, controller.tree)
    if adapter is not None:
        out.append(attach_scheduler(controller, adapter, site.integrations.scheduler))
    out.append(LoopMetrics(controller, group, controller.link))
    out.append(Watchdog(notifier))
    out.extend(options.extra)
    out.extend(TaskIntegration(name, run) for name, run in options.extra_tasks.items())
    if controller.link is not None:
        out.append(AgentLinkIntegration(controller.link, controller))
    return out


def _reloader(
    options: ServiceOptions, controller: Controller, integrations: list[Integration]
) -> Callable[[], None]:
    link = controller.link
    keys = link.keys if isinstance(link, MqttControllerLink) else None

    def reload() -> None:
        if keys is not None:  # agent keys first: a rotation must not wait for a valid config
            keys.reload()
            log.info("SIGHUP: agent key files re-read from %s", keys.keys_dir)
        if options.config_path is None:
            log.warning("SIGHUP: no config path to reload from")
            return
        try:
            new = load_site(options.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: new config refused, the running one stays:\n%s", exc)
            controller.audit.record("config_refused", str(exc), now_s=time.time())
            return
        controller.reload(new)
        for i in integrations:
            if isinstance(i, BmsIntegration):
                i.link.replace_tree(controller.tree)
        log.info("SIGHUP: config reloaded from %s", options.config_path)

    return reload


async def _close(integrations: list[Integration]) -> None:
    """Each integration's aclose, in order; one failing does not keep the rest open."""
    for i in integrations:
        try:
            await i.aclose()
        except Exception as exc:
            log.error("%s: close failed: %s", i.name, exc)


async def run_service(site: Site, options: ServiceOptions, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set; returns the exit code.

    Build the core, build the integrations the config asks for, run each in one
    TaskGroup, then loop cycles: each cycle's result goes to every integration's publish,
    isolated (controller/core/integration.py)."""
    quiet_aiomqtt_close_race()
    notifier = Notifier()
    link = _agent_link(site, options)
    audit = AuditLog(path=options.audit_path)
    controller = Controller(
        site,
        mode=options.mode,
        link=link,
        controller_id=options.controller_id,
        audit=audit,
        metrics=Metrics(site.name),
        points=site.integrations.influx is not None,
    )
    _check_keys(link.keys if isinstance(link, MqttControllerLink) else None, controller)
    group = PollGroup(controller.accept_readings)
    params = polled_device_params(site.devices)
    controller.device_health = _device_health(
        group, time.monotonic, {p.device_id: p.stale_s for p in params}
    )
    controller.device_stats = group.stats
    settings = {p.device_id: PollSettings.from_params(p) for p in params}
    controller.metrics.set_device_errors_source(group.error_counts)
    integrations = build_integrations(site, options, controller, group, notifier)
    audit.record(
        "start",
        f"controller {controller.controller_id} starting in {options.mode} mode"
        f" for site {site.name} ({len(controller.tree.gpus)} GPUs)",
        now_s=time.time(),
    )
    if options.install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reloader(options, controller, integrations))

    async def body(now_s: float) -> None:
        deliver(controller.run_cycle(now_s), integrations, controller.phases)

    try:
        for pollable in build_pollables(params):
            group.add(pollable, settings[pollable.name])
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(i.run(stop), name=i.name) for i in integrations]
            tasks.append(
                tg.create_task(
                    run_cycle(
                        body,
                        site.policy.cycle_s,
                        controller.cycle_stats,
                        stop,
                        on_overrun=lambda _: controller.metrics.cycle_overruns.inc(),
                    ),
                    name="control-cycle",
                )
            )
            api = next((i.server for i in integrations if isinstance(i, ApiIntegration)), None)
            url = api.url if api is not None else None
            notifier.ready(f"controlling site {site.name} in {options.mode} mode")
            log.info(
                "controller %s running: %d devices polled, %d agents, API %s",
                controller.controller_id,
                len(params),
                len(controller.agents),
                url or "off",
            )
            if options.on_ready is not None:
                options.on_ready(controller, url)
            await stop.wait()
            # Stop acting first: no lease is sent after this point.
            controller.stopping = True
            notifier.stopping()
            audit.record(
                "stop",
                "controller stopping: leases will expire into the agents' failsafe cap",
                now_s=time.time(),
            )
            await _close(integrations)
            await group.close()
            for t in tasks:  # whatever did not end by itself (e.g. a reader on a closed link)
                t.cancel()
    finally:
        await group.close()
        audit.close()
        notifier.close()
    return 0
