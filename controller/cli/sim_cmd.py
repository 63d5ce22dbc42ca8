"""``rackpower sim --config FILE``: the site's simulated hardware as a process.

The controller side only parses arguments and the site config here; the simulator
(``sim``) is imported inside the handler, so the daemon never loads it.

Exit codes: 0 after a clean stop (SIGTERM, Ctrl-C or ``--duration``), 2 for a bad config
or arguments, 1 when it cannot run (a port taken, the plant failing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from controller.cli.cmdutil import setup_logging
from controller.model.config import ConfigError, Site
from controller.model.loader import load_site

if TYPE_CHECKING:
    from sim.runtime import SimRuntime

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger("rackpower.sim")

CONTROL_HELP = """\
control channel (loopback HTTP/JSON, no auth; URL printed at start and written to
--control-file):
  GET    /v1/state                     plant summary: time, powers, trips, faults
  GET    /v1/endpoints                 the endpoint list
  GET    /v1/points/DEVICE[/POINT]     what a device serves now (map units)
  PUT    /v1/faults/DEVICE             {"kind": "delay|timeout|exception|garbage|gone",
                                        "delay_s": 0.2, "exception_code": 4}
  DELETE /v1/faults/DEVICE             clear it (DELETE /v1/faults clears all)
  POST   /v1/load-step                 {"scale": 1.3}  (1.0 = workloads as they are)
  POST   /v1/sources/SOURCE/lose       a feed source (A/B) goes dead; .../restore
  POST   /v1/reclose                   {} or {"elements": [...]}: reset tripped breakers
e.g. curl -X PUT $URL/v1/faults/pdu-row-1-rack-1 -d '{"kind": "timeout"}'

exit codes: 0 clean stop, 2 bad config or arguments, 1 cannot run (port taken)."""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sim",
        help="serve a site's simulated meters over Modbus/TCP and SNMP, driven by the plant",
        description=(
            "Run the plant model of a site (GPUs, converters, breakers; seeded training and"
            " inference workloads) in real time and serve every Modbus and SNMP device of"
            " the site config through its device map, so the controller or real tools"
            " (mbpoll, snmpget) can poll it. Prints the endpoints and, with"
            " --endpoints-json, writes them as a JSON list (device, protocol, host, port,"
            " unit_id or community, probe) once every port is listening."
        ),
        epilog=CONTROL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="site YAML, e.g. configs/sites/demo.yaml")
    p.add_argument("--endpoints-json", metavar="OUT", help="write the endpoint list here")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    ports = p.add_mutually_exclusive_group()
    ports.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="let the kernel pick every port (grouping by address stays the config's)",
    )
    ports.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="serve on the config's ports plus N",
    )
    p.add_argument("--host", help="bind every frontend here instead of the config's hosts")
    p.add_argument("--duration", type=_positive, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--time-scale",
        type=_positive,
        default=1.0,
        metavar="X",
        help="simulated seconds per wall second (default 1)",
    )
    p.add_argument(
        "--control-port",
        type=int,
        default=0,
        metavar="P",
        help="control channel port on 127.0.0.1 (default 0: any free port)",
    )
    p.add_argument(
        "--control-file", metavar="OUT", help='write {"url": ...} of the control channel here'
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default warning)",
    )
    p.set_defaults(handler=cmd_sim)


def _write_json(path: str, data: Any) -> None:
    """Write whole or not at all: a reader polling for the file never sees half of it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(target)


def _probe_text(probe: dict[str, Any]) -> str:
    if "oid" in probe:
        return f"{probe['oid']} ({probe.get('point', '')})"
    if "address" in probe:
        what = [str(probe[k]) for k in ("point", "type", "order") if k in probe]
        return f"holding {probe['address']} ({', '.join(what)})"
    return "-"


def print_endpoints(endpoints: list[dict[str, Any]], out: TextIO) -> None:
    rows = [
        (
            e["device"],
            e["protocol"],
            f"{e['host']}:{e['port']}",
            f"unit {e['unit_id']}" if "unit_id" in e else f"community {e['community']}",
            _probe_text(e["probe"]),
        )
        for e in endpoints
    ]
    header = ("DEVICE", "PROTOCOL", "ADDRESS", "UNIT/COMMUNITY", "PROBE")
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(4)]
    for r in [header, *rows]:
        print(
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4],
            file=out,
        )


def cmd_sim(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_logging(args.log_level)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(run_sim(site, args))
    except OSError as exc:
        print(f"rackpower sim: {exc} (try --ephemeral-ports or --port-offset)", file=sys.stderr)
        return EXIT_FAILURE


async def run_sim(site: Site, args: argparse.Namespace) -> int:
    from sim.control import ControlServer  # the daemon never imports sim: only this command
    from sim.runtime import SimRuntime

    sim = SimRuntime(
        site,
        seed=args.seed,
        time_scale=args.time_scale,
        host=args.host,
        port_offset=args.port_offset,
        ephemeral=args.ephemeral_ports,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with sim, ControlServer(sim, port=args.control_port) as control:
        _announce(sim, site, args, control.url)
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(sim.wait())]
        if args.duration is not None:
            waiters.append(asyncio.create_task(asyncio.sleep(args.duration)))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                log.error("simulator stopped: %r", t.exception())
                return EXIT_FAILURE
    log.info("simulator stopped after %.1f s of plant time", sim.t_s)
    return EXIT_OK


def _announce(sim: SimRuntime, site: Site, args: argparse.Namespace, control_url: str) -> None:
    endpoints = sim.endpoints()
    out = sys.stdout
    print(
        f"rackpower sim: site {site.name!r}, {len(sim.tree.gpus)} GPUs,"
        f" {len(sim.scheduler.progress())} jobs, seed {args.seed},"
        f" time x{args.time_scale:g}",
        file=out,
    )
    print_endpoints(endpoints, out)
    print(f"control: {control_url}  (rackpower sim --help lists its endpoints)", file=out)
    out.flush()
    if args.control_file:
        _write_json(args.control_file, {"url": control_url})
    if args.endpoints_json:
        _write_json(args.endpoints_json, endpoints)


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.cli.sim_cmd ARGS``: the same command without the full CLI."""
    parser = argparse.ArgumentParser(prog="rackpower")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        result: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
