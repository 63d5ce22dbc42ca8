"""``rackpower mqtt acl``: write a site's broker identities as Mosquitto files.

A command rather than a hand-kept file because the ACL must list every agent of the
site: a node added to the config without its ``user`` block could not talk to the
controller, and a hand-written wildcard would let one node speak for another.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controller.cli.cmdutil import load_site_or_report
from controller.integrations.broker_acl import (
    DEFAULT_BMS_USER,
    ListenerSettings,
    PlanError,
    plan_for_site,
    render_acl,
    render_mosquitto_conf,
    render_password_template,
)
from controller.model.config import ConfigError, Site

EXIT_BAD_INPUT = 2


def _write(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` whole (a broker reloading mid-write must not read half an ACL)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def _acl(args: argparse.Namespace) -> int:
    site = load_site_or_report(args.config)
    if site is None:
        return EXIT_BAD_INPUT
    try:
        plan = plan_for_site(site, controller_user=args.controller_user, bms_user=args.bms_user)
    except PlanError as exc:
        print(ConfigError(site.source, exc.problems).report(), file=sys.stderr)
        return EXIT_BAD_INPUT
    stem = f"rackpower-{site.name}"
    install = args.install_dir.rstrip("/") or "/"
    listener = ListenerSettings(
        port=args.port,
        bind=args.bind,
        certfile=args.tls_cert or f"{install}/certs/server.crt",
        keyfile=args.tls_key or f"{install}/certs/server.key",
        acl_file=f"{install}/{stem}.acl",
        password_file=f"{install}/{stem}.passwd",
    )
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = {
            out / f"{stem}.acl": (render_acl(plan), 0o644),
            out / f"{stem}.passwd.template": (
                render_password_template(plan, listener.password_file, f"{stem}.passwd.template"),
                0o644,
            ),
            out / f"{stem}.conf": (render_mosquitto_conf(plan, listener), 0o644),
        }
        for path, (text, mode) in files.items():
            _write(path, text, mode)
    except OSError as exc:
        print(f"rackpower mqtt acl: {args.out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    n_agents = sum(1 for i in plan.identities if i.role == "agent")
    print(
        f"{site.source}: {len(plan.identities)} broker identities for site {site.name!r}"
        f" (controller {plan.controller_user!r}, BMS {args.bms_user!r},"
        f" {n_agents} agents)"
    )
    for path in files:
        print(f"  wrote {path}")
    # What would not work with these files, said now rather than at the first connect.
    for warning in _warnings(site, plan.controller_user):
        print(f"warning: {site.source}: {warning}", file=sys.stderr)
    return 0


def _warnings(site: Site, controller_user: str) -> list[str]:
    mqtt = site.integrations.mqtt
    if mqtt is None:
        return [
            "integrations.mqtt is not set: topics use the default prefix 'rackpower'; the"
            f" controller must connect as {controller_user!r} over mqtts://"
        ]
    out = []
    if mqtt.username is None:
        out.append(
            "integrations.mqtt.username is not set: the controller would connect"
            f" anonymously, which this broker refuses (use {controller_user!r})"
        )
    elif mqtt.username != controller_user:
        out.append(
            f"integrations.mqtt.username is {mqtt.username!r} but the ACL grants the"
            f" controller's topics to {controller_user!r}"
        )
    if not (mqtt.tls or mqtt.url.lower().startswith("mqtts://")):
        out.append(
            f"integrations.mqtt.url {mqtt.url!r} is not mqtts://; the generated listener"
            " accepts TLS only"
        )
    return out


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mqtt",
        help="broker tooling (per-client identities for Mosquitto)",
        description="Broker tooling for the site's MQTT integration.",
    )
    mqtt_sub = p.add_subparsers(dest="mqtt_command", metavar="SUBCOMMAND", required=True)
    a = mqtt_sub.add_parser(
        "acl",
        help="write a Mosquitto ACL, password file template and conf snippet for a site",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Give every client of the site's broker its own username and only its own\n"
            "topics, and write the Mosquitto files for it into --out-dir:\n"
            "\n"
            "  rackpower-<site>.acl              acl_file: one `user` block per identity\n"
            "  rackpower-<site>.passwd.template  the usernames (no secrets), and how to make\n"
            "                                    the password file with mosquitto_passwd\n"
            "  rackpower-<site>.conf             conf.d snippet: TLS listener,\n"
            "                                    allow_anonymous false, acl_file, password_file\n"
            "\n"
            "Identities: each node agent (username = its agent id) may publish only its own\n"
            "agent/<id>/telemetry and /status and read only its own agent/<id>/lease; the\n"
            "controller (default: integrations.mqtt.username, else rackpower-<site>) sends\n"
            "leases to every agent, reads their telemetry and status, publishes BMS status,\n"
            "telemetry, alarms and acks and reads commands; the BMS may only publish\n"
            "commands and read acks, status, telemetry and alarms. Anonymous clients get\n"
            "nothing. Mosquitto drops a publish the ACL does not allow without telling the\n"
            "client. Regenerate and reload the broker after adding agents.\n"
            "\n"
            "Exits 2 with every problem on stderr if the site is invalid or cannot be\n"
            "expressed as broker identities (no MQTT integration, a wildcard in the topic\n"
            "prefix, an agent id that is no valid username, two clients with one name)."
        ),
    )
    a.add_argument("--config", required=True, help="site YAML file")
    a.add_argument("--out-dir", default=".", help="where to write the files (default: .)")
    a.add_argument(
        "--controller-user",
        default=None,
        help="the controller's broker username (default: integrations.mqtt.username,"
        " else rackpower-<site>)",
    )
    a.add_argument(
        "--bms-user", default=DEFAULT_BMS_USER, help="the BMS's broker username (default: bms)"
    )
    a.add_argument(
        "--install-dir",
        default="/etc/mosquitto",
        help="where the ACL and password file will live on the broker host, as the conf"
        " snippet names them (default: /etc/mosquitto)",
    )
    a.add_argument("--port", type=_port, default=8883, help="TLS listener port (default: 8883)")
    a.add_argument("--bind", default=None, help="listener address (default: every interface)")
    a.add_argument(
        "--tls-cert",
        default=None,
        help="server certificate (default: <install-dir>/certs/server.crt)",
    )
    a.add_argument(
        "--tls-key", default=None, help="server key (default: <install-dir>/certs/server.key)"
    )
    a.set_defaults(handler=_acl)
