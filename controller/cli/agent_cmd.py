"""``rackpower agent --config FILE``: the node agent as a process.

Exit codes as for every command: 0 after a clean stop (SIGTERM or Ctrl-C), 2 for a bad
config (no ``auth.key_file`` without ``auth.allow_unsigned: true``, or a key file others
can read, included), 1 when it cannot run (no NVML on this machine, a broker secret
missing). SIGHUP re-reads the key file (it is also re-read when it changes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from controller.agent.agent_config import AgentConfig, auth_problem, load_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.msgauth import KeyFile, KeyFileError
from controller.agentlink.transport import MqttAgentLink
from controller.cli.cmdutil import setup_logging
from controller.model.config import ConfigError
from controller.support.mqtt import MqttSetupError, quiet_aiomqtt_close_race
from drivers.nvml import NvmlDriver, NvmlDriverError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger("rackpower.agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent: NVML telemetry up, leased caps down, failsafe cap",
        description=(
            "Run on a GPU node. Reads every GPU through NVML and sends telemetry to the"
            " controller over MQTT; applies the power caps the controller leases (only from"
            " its configured controller, only newer ones, only inside each GPU's limits);"
            " applies the configured failsafe cap at start, when a lease runs out and on"
            " stop. Setting limits needs root."
        ),
        epilog="Exit codes: 0 clean stop, 2 bad config, 1 cannot run (e.g. no NVML).",
    )
    p.add_argument("--config", required=True, help="agent YAML, e.g. configs/agents/example.yaml")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    p.set_defaults(handler=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        cfg = load_agent_config(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = auth_problem(cfg)  # secure by default: no key, no start (unless allowed)
    if problem is not None:
        print(ConfigError(args.config, [problem]).report(), file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_logging(args.log_level)
    try:
        key_file = None if cfg.auth is None else cfg.auth.key_file
        keys = (
            None
            if cfg.auth is None or key_file is None
            else KeyFile(key_file, check_every_s=cfg.auth.check_every_s)
        )
    except KeyFileError as exc:
        print(f"rackpower agent: auth.key_file: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return asyncio.run(run_agent(cfg, keys))
    except (NvmlDriverError, MqttSetupError) as exc:
        print(f"rackpower agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE


async def run_agent(cfg: AgentConfig, keys: KeyFile | None = None) -> int:
    """NVML driver, MQTT link and agent until SIGTERM/SIGINT; failsafe applied on the way out."""
    quiet_aiomqtt_close_race()
    link = MqttAgentLink(
        cfg.mqtt.as_site_mqtt(),
        cfg.site,
        cfg.agent_id,
        keepalive_s=cfg.mqtt.keepalive_s,
        keys=keys,
    )
    if keys is None:
        log.warning(
            "LEASES UNAUTHENTICATED (auth.allow_unsigned: true): this agent obeys any"
            " well-formed lease with its controller id from anyone on the broker; set"
            " auth.key_file instead (docs/agent-link.md)"
        )
    async with NvmlDriver(cfg.node_id, confirm_timeout_s=cfg.nvml.confirm_timeout_s) as driver:
        agent = NodeAgent(cfg, driver, link)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, agent.stop)
        if keys is not None:
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, keys.reload)
        log.info(
            "agent %s for node %s (%d GPUs), obeying controller %s (%s), failsafe %g W per GPU",
            cfg.agent_id,
            cfg.node_id,
            len(driver.gpus),
            cfg.controller_id,
            "signed leases only" if keys is not None else "UNSIGNED",
            cfg.failsafe_w,
        )
        async with asyncio.TaskGroup() as tg:
            link_task = tg.create_task(link.run(), name="agent-link")
            await agent.run()
            await link.stop()
            await link_task
    return EXIT_OK
