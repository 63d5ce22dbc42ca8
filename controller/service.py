"""Run a controller as a service: every piece a named task in one TaskGroup.

Tasks: the control cycle, the device pollers, the agent link and its telemetry reader,
the BMS link, the TSDB writer, the HTTP API, and the systemd watchdog. An integration
that fails is retried with backoff by its own loop and never stops the cycle; only the
cycle's own death (or a signal) ends the service.

Signals: SIGTERM/SIGINT stop acting (no more leases: the agents' leases run out into
their failsafe cap), publish ``offline``, flush what is buffered and exit 0. SIGHUP
reloads the config, validated before it replaces the running one; a bad file is refused
with a log line and an audit event, and the old config keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controller.agentlink.msgauth import KeyStore
from controller.agentlink.transport import ControllerLink, MqttControllerLink
from controller.core.audit import AuditLog
from controller.core.controller import Controller, Mode
from controller.core.cycle import run_cycle
from controller.core.metrics import Metrics
from controller.core.setpoints import Ack, Command, ModeSwitch
from controller.integrations.api.app import ApiServer, create_app
from controller.integrations.bms.bridge import BmsLink
from controller.integrations.scheduler.attach import attach_scheduler
from controller.integrations.scheduler.factory import build_adapter
from controller.integrations.tsdb.writer import TsdbWriter, tsdb_point
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
    extra_tasks: Mapping[str, Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=dict)


async def _retry_forever(
    name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Keep an integration running; its failure is logged, backed off and never fatal."""
    delay = 1.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            await run()
            if stop.is_set():
                return
            log.warning("%s returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s failed: %s; retrying in %.0f s", name, exc, delay)
        if time.monotonic() - started > 60:
            delay = 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, 60.0)


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


async def run_service(site: Site, options: ServiceOptions, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set; returns the exit code."""
    quiet_aiomqtt_close_race()
    notifier = Notifier()
    integrations = site.integrations
    audit = AuditLog(path=options.audit_path)
    metrics = Metrics(site.name)
    link = options.link
    keys: KeyStore | None = None
    if link is None and integrations.mqtt is not None:
        # load_site refuses agents on MQTT without agent_auth; a Site put together in
        # code has not been through it, so ask the same rule again: no key, no start.
        for problem in agent_auth_problems(site.spec, site.nodes):
            raise ValueError(f"{site.source}: {problem.path}: {problem.message}")
        auth = integrations.agent_auth
        if auth is not None and auth.keys_dir is not None:
            # A directory missing, unreadable or open to others stops the start here.
            keys = KeyStore(auth.keys_dir, check_every_s=auth.check_every_s)
        link = MqttControllerLink(integrations.mqtt, site.name, keys=keys)
    if isinstance(link, MqttControllerLink):
        keys = link.keys
        if keys is None:
            log.warning(
                "AGENT LINK UNAUTHENTICATED (integrations.agent_auth.allow_unsigned): leases"
                " go out unsigned and any telemetry is believed, so anyone who can publish on"
                " the broker can raise or lower GPU caps and fake readings; set"
                " integrations.agent_auth.keys_dir instead (docs/agent-link.md)"
            )
    controller = Controller(
        site,
        mode=options.mode,
        link=link,
        controller_id=options.controller_id,
        audit=audit,
        metrics=metrics,
    )
    if keys is not None:
        missing = keys.missing(sorted(controller.agents))
        if missing:
            log.error(
                "no usable agent key for %d of %d agents (they get no lease, their telemetry"
                " is refused): %s%s",
                len(missing),
                len(controller.agents),
                ", ".join(missing[:5]),
                " ..." if len(missing) > 5 else "",
            )
            log.error("first key problem: %s", keys.problem(missing[0]))
    scheduler_link = None
    adapter = build_adapter(integrations.scheduler, controller.tree)
    if adapter is not None:
        scheduler_link = attach_scheduler(controller, adapter, integrations.scheduler)
    audit.record(
        "start",
        f"controller {controller.controller_id} starting in {options.mode} mode"
        f" for site {site.name} ({len(controller.tree.gpus)} GPUs)",
        now_s=time.time(),
    )

    group = PollGroup(controller.accept_readings)
    params = polled_device_params(site.devices)
    settings = {p.device_id: PollSettings.from_params(p) for p in params}
    stale = {p.device_id: p.stale_s for p in params}
    controller.device_health = _device_health(group, time.monotonic, stale)
    controller.device_stats = group.stats
    metrics.set_device_errors_source(group.error_counts)

    writer: TsdbWriter | None = None
    if integrations.influx is not None:
        writer = TsdbWriter(integrations.influx)
        w = writer

        def submit(points):  # type: ignore[no-untyped-def]
            # The writer's counters share the cycle's timestamp, as the schema says.
            ts_ns = points[0].ts_ns if points else time.time_ns()
            w.submit([*points, tsdb_point(site.name, w.stats(), ts_ns=ts_ns)])
            metrics.set_tsdb_dropped(w.stats().dropped_points)

        controller.on_points = submit

    bms: BmsLink | None = None
    if integrations.mqtt is not None:

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

        bms = BmsLink(
            integrations.mqtt,
            controller.tree,
            telemetry=lambda: controller.telemetry_frames,
            on_command=on_command,
            on_rejected=on_rejected,
            overrides=controller.overrides,
        )
        b = bms
        metrics.watch_bms(lambda: asdict(b.stats()))
        controller.on_alarm_raise = b.raise_alarm

        def clear(alarm_id: str) -> None:
            b.clear_alarm(alarm_id)

        controller.on_alarm_clear = clear

    api: ApiServer | None = None
    if options.api:
        app = create_app(
            controller,
            integrations.api,
            reservations=controller.reservations,
            audit=audit,
            metrics=metrics,
            allow_unauthenticated=options.allow_unauthenticated,
        )
        api = ApiServer(
            app,
            host=integrations.api.host,
            port=integrations.api.port if options.api_port is None else options.api_port,
        )
        api.bind()

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
            audit.record("config_refused", str(exc), now_s=time.time())
            return
        controller.reload(new)
        if bms is not None:
            bms.replace_tree(controller.tree)
        log.info("SIGHUP: config reloaded from %s", options.config_path)

    loop = asyncio.get_running_loop()
    if options.install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)

    async def telemetry_reader() -> None:
        if link is None:
            return
        async for t in link.telemetry():
            controller.accept_telemetry(t)

    async def body(now_s: float) -> None:
        controller.run_cycle(now_s)
        # Overruns (long, failed or late-started cycles) reach the metrics through
        # run_cycle's on_overrun, the one place that decides what an overrun is.
        stats = controller.cycle_stats  # the previous cycle's: this one is not over
        metrics.observe_cycle(stats.last_duration_s, cpu_s=stats.last_cpu_s)
        for dev, st in group.stats().items():
            if st.last_poll_duration_s is not None:
                # Errors are counted by kind in rackpower_device_errors_total; the last
                # error's text is a device's own words, never a label.
                metrics.observe_poll(dev, st.last_poll_duration_s)
        if isinstance(link, MqttControllerLink):  # the in-process link neither signs nor refuses
            ls = link.stats()
            metrics.set_agent_link(ls.auth_refused, ls.leases_no_key)

    async def watchdog() -> None:
        interval = notifier.watchdog_interval_s() or 5.0
        while not stop.is_set():
            last = controller.cycle_stats.cycles
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if controller.cycle_stats.cycles > last:  # only a turning loop feeds the dog
                notifier.watchdog()

    async def cycle() -> None:
        await run_cycle(
            body,
            site.policy.cycle_s,
            controller.cycle_stats,
            stop,
            on_overrun=lambda _: metrics.cycle_overruns.inc(),
        )

    try:
        for pollable in build_pollables(params):
            group.add(pollable, settings[pollable.name])
        if writer is not None:
            writer.start()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(cycle(), name="control-cycle"),
                tg.create_task(watchdog(), name="watchdog"),
            ]
            if link is not None:
                tasks.append(
                    tg.create_task(_retry_forever("agent link", link.run, stop), name="agent-link")
                )
                tasks.append(
                    tg.create_task(
                        _retry_forever("agent telemetry", telemetry_reader, stop), name="telemetry"
                    )
                )
            if bms is not None:
                tasks.append(tg.create_task(_retry_forever("BMS link", bms.run, stop), name="bms"))
            if api is not None:
                tasks.append(tg.create_task(api.serve(), name="api"))
            if scheduler_link is not None:
                sl = scheduler_link
                tasks.append(
                    tg.create_task(_retry_forever("scheduler", sl.run, stop), name="scheduler")
                )
            for name, task in options.extra_tasks.items():
                tasks.append(tg.create_task(task(), name=name))
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
            if bms is not None:
                await bms.stop()
            if writer is not None:
                await writer.aclose()
            if api is not None:
                await api.shutdown()
            if link is not None:
                await link.stop()
            await group.close()
            for t in tasks:  # whatever did not end by itself (e.g. a reader on a closed link)
                t.cancel()
    finally:
        await group.close()
        audit.close()
        notifier.close()
    return 0
