"""``rackpower run``: the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from controller.config import ConfigError, load_site
from controller.devices import DeviceSetupError


def _run(args: argparse.Namespace) -> int:
    from controller.service import ServiceOptions, run_service

    try:
        site = load_site(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = ServiceOptions(
        mode=args.mode,
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
    p.add_argument("--api-port", type=int, default=None, help="override the API port (0: any)")
    p.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    p.add_argument(
        "--audit-log", default=None, help="append the audit trail to this JSON-lines file"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=_run)
