"""``rackpower`` command line: one entry point, one sub-command per process of the design.

Exit codes: 0 success, 2 bad input (config, arguments), 1 anything else. Errors go to
stderr as plain sentences; a stack trace is a bug.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from controller.cli import (
    agent_cmd,
    demo_cmd,
    headroom_cmd,
    mqtt_cmd,
    run_cmd,
    scenario_cmd,
    shipped_cmd,
    sim_cmd,
    status_cmd,
)
from controller.cli.config_warnings import render_warnings
from controller.model.config import ConfigError
from controller.model.loader import load_site
from controller.model.topology import PowerTree

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def _fmt_w(watts: float) -> str:
    for unit, scale in (("MW", 1e6), ("kW", 1e3)):
        if abs(watts) >= scale:
            return f"{watts / scale:,.2f} {unit}"
    return f"{watts:,.0f} W"


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith("s") else "s")


def cmd_validate(args: argparse.Namespace) -> int:
    """Load, expand and check a site file; print what it describes."""
    started = time.perf_counter()
    try:
        site = load_site(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_BAD_INPUT
    warnings = render_warnings(site)  # legal but suspicious: stderr, exit 0
    tree = PowerTree(site)
    elapsed_s = time.perf_counter() - started
    for line in warnings:
        print(line, file=sys.stderr)
    counts = tree.counts()
    total_env = sum(tree.effective_envelope_w(r) for r in tree.roots)
    max_draw = sum(tree.max_draw_w(r) for r in tree.roots)
    print(f"{site.source}: site {site.name!r} is valid ({elapsed_s * 1000:.0f} ms)")
    print("  " + ", ".join(f"{counts[k]} {_plural(k, counts[k])}" for k in counts))
    print(f"  devices: {len(site.devices)}")
    print(f"  total envelope at the feeds: {_fmt_w(total_env)}")
    print(
        f"  GPUs: {len(tree.gpus)}, maximum draw: {_fmt_w(max_draw)}"
        f" ({max_draw / total_env:.2f}x the feed envelope)"
    )
    print("  most oversubscribed (max draw / envelope):")
    for nid, ratio in tree.most_oversubscribed(args.top):
        node = tree.node(nid)
        print(f"    {node.kind:5} {nid:24} {ratio:5.2f}x  envelope {_fmt_w(node.envelope_w)}")
    for src_id, changed in tree.n_minus_1().items():
        for nid, env in changed.items():
            print(f"  N-1: without {src_id}, {nid} may carry {_fmt_w(env)}")
    return EXIT_OK


Handler = Callable[[argparse.Namespace], int]
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

# Explicit list of command modules (no import-by-name): each has ``register(sub)``.
_COMMANDS: list[Register] = [
    run_cmd.register,
    agent_cmd.register,
    sim_cmd.register,
    demo_cmd.register,
    status_cmd.register,
    scenario_cmd.register,
    headroom_cmd.register,
    mqtt_cmd.register,
    shipped_cmd.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rackpower",
        description=(
            "Power and telemetry controller for AI data center racks: keeps every level of"
            " the power tree (feed, SST, bus, row, rack) inside its envelope by capping GPU"
            " power job by job."
        ),
        epilog="Exit codes: 0 success, 2 bad input, 1 other failure.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check a site config and print a summary of its power tree",
        description=(
            "Validate a site YAML file (schema, references, units, envelopes against"
            " ratings, parents and GPU floors, A/B redundancy, duplicate devices, addresses"
            " and URLs) and print counts, envelopes and the most oversubscribed nodes."
            " Exits 2 with every problem on stderr if it is invalid; warnings (legal but"
            " suspicious settings) go to stderr with exit 0."
        ),
    )
    p.add_argument(
        "config",
        help="site YAML file, e.g. configs/sites/demo.yaml ($(rackpower shipped sites/demo.yaml))",
    )
    p.add_argument("--top", type=int, default=5, help="how many oversubscribed nodes to list")
    p.set_defaults(handler=cmd_validate)

    # Each further command lives in its own module and adds its own sub-parser.
    for register in _COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `rackpower validate ... | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
