"""Per-client broker identities: who may publish and read which MQTT topic, for Mosquitto.

The agent link and the BMS link authenticate nothing on the broker by themselves: any
client that can connect can publish a lease, an agent's telemetry or a BMS command. A
broker that gives every client its own username and grants it only its own topics
closes that door for clients that are not ours, and for a node whose root user has
stolen its agent's credentials it limits the damage to that one node's topics.

This module turns a validated site into that plan (:func:`plan_for_site`) and renders
it as Mosquitto files: an ``acl_file``, a password file template (usernames only: the
secrets are made on the broker host with ``mosquitto_passwd``) and a ``mosquitto.conf``
snippet with a TLS listener and ``allow_anonymous false``. Topic strings come from the
links' own topic classes, so the ACL cannot drift from what the links publish.

Mosquitto (2.0) semantics relied on, see mosquitto.conf(5): ``topic`` lines after
``user <name>`` apply to that user only; lines before any ``user`` line would apply to
anonymous clients, and ``pattern`` lines to every client, so neither is written. A
wildcard subscription is granted but each message is checked against ``read`` on
delivery, and a publish without ``write`` is acknowledged and silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from controller.agentlink.transport import AgentTopics
from controller.integrations.bms.bridge import BmsTopics
from controller.model.config import MqttConfig, Problem, Site
from controller.model.wire_limits import ID_PATTERN

Access = Literal["read", "write"]
Role = Literal["controller", "bms", "agent"]

DEFAULT_BMS_USER = "bms"

# Usernames go into `user <name>` lines and `name:hash` password lines: no blanks, no
# ':' (it ends the name in a password file), nothing a topic level could not hold.
_USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ID_RE = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Rule:
    access: Access
    topic: str


@dataclass(frozen=True, slots=True)
class Identity:
    """One broker username and the only topics it may touch."""

    username: str
    role: Role
    rules: tuple[Rule, ...]
    note: str


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    site: str
    identities: tuple[Identity, ...]

    def identity(self, username: str) -> Identity:
        for ident in self.identities:
            if ident.username == username:
                return ident
        raise KeyError(username)

    @property
    def controller_user(self) -> str:
        return next(i.username for i in self.identities if i.role == "controller")

    @property
    def usernames(self) -> tuple[str, ...]:
        return tuple(i.username for i in self.identities)


class PlanError(ValueError):
    """The site cannot be given broker identities; ``problems`` say where and why."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in self.problems))


def default_controller_user(site: Site) -> str:
    """The username the controller connects with: its configured one, else rackpower-<site>.

    Same default as the controller id (``controller.core.controller.default_controller_id``), so a
    site that sets nothing gets matching names on the broker and in the leases.
    """
    mqtt = site.integrations.mqtt
    if mqtt is not None and mqtt.username:
        return mqtt.username
    return f"rackpower-{site.name}"


def agent_ids(site: Site) -> list[str]:
    """Every agent the controller will lease to or hear from: agent devices and node refs."""
    ids = {d.id for d in site.devices if d.driver == "agent"}
    ids |= {n.agent for n in site.nodes if n.kind == "node" and n.agent is not None}
    return sorted(ids)


def _check_username(name: str, path: str, what: str, problems: list[Problem]) -> None:
    if not _USERNAME_RE.fullmatch(name):
        problems.append(
            Problem(
                path,
                f"{what} {name!r} cannot be a broker username"
                " (use 1-128 letters, digits or _ . -; ':' would end the name in a password file)",
            )
        )


def plan_for_site(
    site: Site, *, controller_user: str | None = None, bms_user: str = DEFAULT_BMS_USER
) -> BrokerPlan:
    """Identities and grants for one site, or :class:`PlanError` listing every problem."""
    problems: list[Problem] = []
    # A site without an MQTT section (the demo takes its broker on the command line)
    # uses the default topic prefix, as its links would.
    mqtt = site.integrations.mqtt or MqttConfig()
    prefix = mqtt.topic_prefix.strip("/")
    if not prefix or any(c in mqtt.topic_prefix for c in "+#\0"):
        problems.append(
            Problem(
                "integrations.mqtt.topic_prefix",
                f"{mqtt.topic_prefix!r} cannot be a topic prefix in an ACL"
                " (empty, or a wildcard + # would grant other topics)",
            )
        )
    if not _ID_RE.fullmatch(site.name):
        problems.append(Problem("site", f"{site.name!r} cannot be an MQTT topic level"))
    ctl = controller_user or default_controller_user(site)
    ctl_path = "integrations.mqtt.username" if controller_user is None else "--controller-user"
    _check_username(ctl, ctl_path, "controller username", problems)
    _check_username(bms_user, "--bms-user", "BMS username", problems)
    agents = agent_ids(site)
    for aid in agents:
        _check_username(aid, site.device_paths.get(aid, "devices"), "agent id", problems)
    owners: dict[str, str] = {}
    claims = [(ctl, "the controller", ctl_path), (bms_user, "the BMS", "--bms-user")]
    claims += [(a, f"agent {a}", site.device_paths.get(a, "devices")) for a in agents]
    for name, who, path in claims:
        if name in owners:
            problems.append(
                Problem(path, f"username {name!r} is both {owners[name]} and {who}: one each")
            )
        owners.setdefault(name, who)
    if problems:
        raise PlanError(problems)

    bms = BmsTopics.for_site(prefix, site.name)
    agent = AgentTopics.for_site(prefix, site.name)
    controller = Identity(
        ctl,
        "controller",
        (
            Rule("write", bms.status),
            Rule("write", f"{bms.base}/telemetry/#"),
            Rule("write", f"{bms.base}/alarms/#"),
            Rule("write", bms.ack),
            Rule("read", bms.cmd),
            Rule("write", f"{agent.base}/+/lease"),
            Rule("read", agent.all_telemetry),
            Rule("read", agent.all_status),
        ),
        "the controller: BMS status, telemetry, alarms and acks out, commands in;"
        " leases to every agent, every agent's telemetry and status in",
    )
    bms_ident = Identity(
        bms_user,
        "bms",
        (
            Rule("write", bms.cmd),
            Rule("read", bms.ack),
            Rule("read", bms.status),
            Rule("read", f"{bms.base}/telemetry/#"),
            Rule("read", f"{bms.base}/alarms/#"),
        ),
        "the BMS: commands out; acks, controller status, node telemetry and alarms in",
    )
    agent_idents = [
        Identity(
            aid,
            "agent",
            (
                Rule("write", agent.telemetry(aid)),
                Rule("write", agent.status(aid)),
                Rule("read", agent.lease(aid)),
            ),
            f"node agent {aid}: its own telemetry and status out, its own lease in",
        )
        for aid in agents
    ]
    return BrokerPlan(site.name, (controller, bms_ident, *agent_idents))


def _header(site: str, what: str) -> list[str]:
    return [
        f"# {what} for rackpower site {site!r}",
        "# Generated by `rackpower mqtt acl`: regenerate after changing the site, do not edit.",
    ]


def render_acl(plan: BrokerPlan) -> str:
    """Mosquitto ``acl_file``: one ``user`` block per identity, nothing for anonymous."""
    lines = _header(plan.site, "Mosquitto ACL")
    lines += [
        "# No topic line precedes the first `user` line and there are no `pattern` lines:",
        "# an anonymous client (refused anyway: allow_anonymous false) is granted nothing.",
    ]
    for ident in plan.identities:
        lines += ["", f"# {ident.note}", f"user {ident.username}"]
        lines += [f"topic {r.access} {r.topic}" for r in ident.rules]
    return "\n".join(lines) + "\n"


def render_password_template(plan: BrokerPlan, password_file: str, template_name: str) -> str:
    """Usernames, one a line, with how to make the real file; not a loadable password file.

    The bare names have no ``:hash``, so a broker pointed at this template by mistake
    lets nobody in (Mosquitto 2.0 refuses every line), and ``mosquitto_passwd -U`` on it
    stops at the comments instead of hashing empty passwords.
    """
    lines = _header(plan.site, "Broker usernames (password file TEMPLATE, no secrets)")
    lines += [
        "# Make the real password file on the broker host, one random password per user:",
        "#",
        "#   umask 077",
        f"#   install -m 600 /dev/null {password_file}",
        f"#   for u in $(grep -v '^#' {template_name}); do",
        '#     openssl rand -base64 24 | tr -d "\\n" > "$u.pw"',
        f'#     mosquitto_passwd -b {password_file} "$u" "$(cat "$u.pw")"',
        "#   done",
        f"#   chown mosquitto: {password_file}",
        "#",
        "# (-b shows the password in the process list for a moment; to type each one",
        f"# instead: mosquitto_passwd {password_file} USER.) Hand each <user>.pw to that",
        "# client only, mode 0600, as its mqtt.password_file, with mqtt.username: <user>.",
        "# Reload the broker (systemctl reload mosquitto) after any change.",
        "",
    ]
    for ident in plan.identities:
        lines.append(ident.username)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Where the generated listener listens and which files it points at."""

    port: int = 8883
    bind: str | None = None
    certfile: str = "/etc/mosquitto/certs/server.crt"
    keyfile: str = "/etc/mosquitto/certs/server.key"
    acl_file: str = "/etc/mosquitto/rackpower.acl"
    password_file: str = "/etc/mosquitto/rackpower.passwd"


def render_mosquitto_conf(plan: BrokerPlan, listener: ListenerSettings) -> str:
    """A ``mosquitto.conf`` snippet: TLS only, no anonymous clients, ACL and passwords."""
    lines = _header(plan.site, "Mosquitto configuration snippet")
    lines += [
        "# Debian: copy to /etc/mosquitto/conf.d/. Once a listener is configured Mosquitto",
        "# no longer opens its default localhost:1883 one; this is the only way in.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {listener.password_file}",
        f"acl_file {listener.acl_file}",
        "",
        f"listener {listener.port}" + (f" {listener.bind}" if listener.bind else ""),
        f"certfile {listener.certfile}",
        f"keyfile {listener.keyfile}",
        "tls_version tlsv1.2",
    ]
    return "\n".join(lines) + "\n"


def usernames_in_template(text: str) -> list[str]:
    """The usernames a template lists (for scripts and tests that fill it)."""
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


def allowed(rules: Iterable[Rule], access: Access, topic: str) -> bool:
    """Whether ``rules`` grant ``access`` on a concrete ``topic``, as Mosquitto matches."""
    return any(r.access == access and _matches(r.topic, topic) for r in rules)


def _matches(pattern: str, topic: str) -> bool:
    pat, top = pattern.split("/"), topic.split("/")
    for i, level in enumerate(pat):
        if level == "#":
            return True  # also matches the parent level itself, as in MQTT
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(pat) == len(top)
