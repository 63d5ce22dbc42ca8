"""``rackpower run``: the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path

from controller.cli.cmdutil import load_site_or_report, log_site_warnings, setup_logging
from controller.model.devices import DeviceSetupError
from controller.model.wire_limits import ID_PATTERN


def _controller_id(text: str) -> str:
    if not re.fullmatch(ID_PATTERN, text) or len(text) > 128:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 1-128 letters, digits or _ . : - (agents match it exactly)"
        )
    return text


def _run(args: argparse.Namespace) -> int:
    from controller.service import ServiceOptions, run_service

    site = load_site_or_report(args.config)
    if site is None:
        return 2
    setup_logging(args.log_level)
    log_site_warnings(site)
    options = ServiceOptions(
        mode=args.mode,
        controller_id=args.controller_id,
        config_path=Path(args.config),
        api_port=args.api_port,
        api=not args.no_api,
        audit_path=Path(args.audit_log) if args.audit_log else None,
    )

    async def main() -> int:
        return await run_service(site, options, asyncio.Event())

    try:
        return asyncio.run(main())
    except (DeviceSetupError, ValueError) as exc:
        print(f"rackpower run: {exc}", file=sys.stderr)
        return 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the controller daemon for a site",
        description=(
            "Poll the site's meters, run the control cycle, lease caps to the node agents,"
            " talk to the BMS over MQTT, write telemetry to InfluxDB and serve the HTTP API,"
            " as the site config says. SIGTERM stops acting (leases expire into the agents'"
            " failsafe cap) and exits 0; SIGHUP reloads the config if it is valid."
        ),
    )
    p.add_argument("--config", required=True, help="site YAML file")
    p.add_argument(
        "--mode",
        choices=("enforce", "advisory"),
        default="enforce",
        help="advisory computes and publishes what it would do and changes nothing"
        " (default: enforce)",
    )
    p.add_argument(
        "--controller-id",
        type=_controller_id,
        default=None,
        help="the id leases carry, which every node agent's controller_id must match"
        " (letters, digits, _ . : -; default: rackpower-<site>)",
    )
    p.add_argument("--api-port", type=int, default=None, help="override the API port (0: any)")
    p.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    p.add_argument(
        "--audit-log", default=None, help="append the audit trail to this JSON-lines file"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=_run)
