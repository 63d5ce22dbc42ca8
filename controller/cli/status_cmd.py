"""``rackpower status [--url URL]``: the power tree of a running controller, as a table.

Reads ``/v1/health`` and ``/v1/tree`` of the API; what an engineer types on the
controller host (or over SSH) to see, without a browser, where the power is and which
levels are tight. Exit codes: 0 shown, 1 controller unreachable or answering an error,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_URL = "http://127.0.0.1:8080"
KINDS = ("feed", "sst", "bus", "row", "rack", "node")


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "status",
        help="print the power tree of a running controller",
        description=(
            "Ask a running controller's API for its power tree and print every node with"
            " its power, envelope, reservations, headroom, caps and alarms."
        ),
    )
    p.add_argument(
        "--url",
        default=os.environ.get("RACKPOWER_URL", DEFAULT_URL),
        help=f"controller API base URL (default: $RACKPOWER_URL or {DEFAULT_URL})",
    )
    p.add_argument(
        "--down-to",
        choices=KINDS,
        default="node",
        help="deepest level to show (default: node, the GPU servers)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the API")
    p.set_defaults(handler=cmd_status)


def _fmt_w(watts: float | None) -> str:
    if watts is None:
        return "-"
    for unit, scale in (("MW", 1e6), ("kW", 1e3)):
        if abs(watts) >= scale:
            return f"{watts / scale:,.2f} {unit}"
    return f"{watts:,.0f} W"


def _bar(load_w: float, envelope_w: float, width: int = 12) -> Text:
    ratio = load_w / envelope_w if envelope_w > 0 else 1.0
    filled = max(0, min(width, round(ratio * width)))
    style = "red" if ratio > 1 else "yellow" if ratio >= 0.9 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("·" * (width - filled), style="dim")
    bar.append(f" {ratio * 100:4.0f}%")
    return bar


def render(tree: dict[str, Any], health: dict[str, Any]) -> tuple[str, Table]:
    """A title line and the table, from the two JSON documents (pure: tests call it)."""
    title = (
        f"site {tree['site']} · {health['status']} · mode {tree['mode']} · "
        f"{health['cycles']} cycles, {health['overruns']} overruns · "
        f"{health['devices_stale']}/{health['devices_total']} devices stale · "
        f"{health['reservations']} reservations"
    )
    table = Table(show_lines=False, header_style="bold")
    for name, justify in (
        ("node", "left"),
        ("kind", "left"),
        ("load / envelope", "left"),
        ("power", "right"),
        ("estimated", "right"),
        ("envelope", "right"),
        ("reserved", "right"),
        ("headroom", "right"),
        ("caps", "right"),
        ("alarms", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "alarms")  # type: ignore[arg-type]
    for n in tree["nodes"]:
        cap = n["cap"]
        caps = f"{cap['capped_gpus']} @ {_fmt_w(cap['limit_w'])}" if cap["capped_gpus"] else ""
        room = Text(_fmt_w(n["headroom_w"]), style="bold red" if n["headroom_w"] < 0 else "")
        power = _fmt_w(n["power_w"]) + (" (stale)" if n["stale"] else "")
        table.add_row(
            "  " * n["depth"] + n["id"],
            n["kind"],
            _bar(n["load_w"], n["envelope_w"]),
            power,
            _fmt_w(n["estimated_w"]),
            _fmt_w(n["envelope_w"]),
            _fmt_w(n["reserved_w"]) if n["reserved_w"] else "",
            room,
            caps,
            Text(", ".join(a["kind"] for a in n["alarms"]), style="bold red"),
        )
    return title, table


def cmd_status(args: argparse.Namespace) -> int:
    url = str(args.url).rstrip("/")
    if not url.startswith(("http://", "https://")):
        print(
            f"rackpower status: --url must start with http:// or https://: {url!r}", file=sys.stderr
        )
        return 2
    try:
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            health = client.get("/v1/health")
            health.raise_for_status()
            tree = client.get("/v1/tree", params={"down_to": args.down_to})
            tree.raise_for_status()
    except httpx.HTTPStatusError as exc:
        print(
            f"rackpower status: {exc.request.url} answered {exc.response.status_code}:"
            f" {exc.response.text[:200]}",
            file=sys.stderr,
        )
        return 1
    except httpx.HTTPError as exc:
        print(f"rackpower status: cannot reach the controller at {url}: {exc}", file=sys.stderr)
        return 1
    console = Console(width=None if sys.stdout.isatty() else 160)
    title, table = render(tree.json(), health.json())
    console.print(title)
    console.print(table)
    return 0
