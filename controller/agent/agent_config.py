"""Node agent configuration: one small YAML file per GPU node.

Validated like the site config (pydantic, ``extra="forbid"``), and errors come out the
same way: ``agent.yaml: failsafe_w: Input should be greater than 0 (got -5)``. The
broker password is never in the file: ``password_env`` or ``password_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, StringConstraints, ValidationError, field_validator, model_validator

from controller.model.config import (
    MQTT_SCHEMES,
    ConfigError,
    MqttConfig,
    Problem,
    Strict,
    check_url,
)
from controller.model.loader import pydantic_problems
from controller.model.wire_limits import ID_PATTERN, MAX_LEASE_S

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]


class AgentMqttConfig(Strict):
    """The broker the agent link runs over (same fields and secrets rules as the site's)."""

    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: Annotated[str, StringConstraints(min_length=1, pattern=r"^[^+#]+$")] = "rackpower"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    tls: bool = False
    keepalive_s: Annotated[int, Field(ge=5, le=600)] = 15

    @field_validator("url")
    @classmethod
    def _url_works(cls, url: str) -> str:
        return check_url(url, MQTT_SCHEMES)

    def as_site_mqtt(self) -> MqttConfig:
        """In the shape controller.support.mqtt resolves URLs and secrets from."""
        return MqttConfig(
            url=self.url,
            topic_prefix=self.topic_prefix,
            username=self.username,
            password_env=self.password_env,
            password_file=self.password_file,
            tls=self.tls,
        )


class AgentAuth(Strict):
    """Where this agent's key is: a file ``<kid> <secret hex>`` per line (one or two
    lines during a rollover), readable only by its owner (0600). Never inline.

    ``rackpower agent`` refuses to start without ``key_file`` (see :func:`auth_problem`):
    an agent that obeys unsigned leases obeys anyone on the broker (F2). ``allow_unsigned:
    true`` instead is the explicit lab mode, with a loud warning at start; both at once
    are refused, as a reader could not tell which holds.
    """

    key_file: Path | None = None
    allow_unsigned: bool = False
    check_every_s: Annotated[float, Field(gt=0, le=3600)] = 1.0

    @model_validator(mode="after")
    def _one_mode(self) -> AgentAuth:
        if self.key_file is None and not self.allow_unsigned:
            raise ValueError(
                "set key_file (this agent's key) or, for a lab only, allow_unsigned: true"
            )
        if self.key_file is not None and self.allow_unsigned:
            raise ValueError(
                "key_file and allow_unsigned: true contradict each other; drop allow_unsigned"
            )
        return self


class NvmlSettings(Strict):
    confirm_timeout_s: Annotated[float, Field(gt=0, le=10)] = 1.0


class AgentConfig(Strict):
    """What one node agent needs: who it is, whom it obeys, and its failsafe cap.

    ``failsafe_w`` is the static safe share per GPU (W): the cap that keeps every level
    of the power tree inside its envelope with every node at it at once and no
    controller. The agent applies it at start (before any lease), when a lease runs out,
    and when it stops. It is clamped into each GPU's NVML range. ``max_lease_s`` caps
    the lease length a controller may grant, so a controller bug cannot switch the
    failsafe off for long.
    """

    site: Annotated[str, StringConstraints(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    agent_id: Id
    node_id: Id
    controller_id: Id
    failsafe_w: Annotated[float, Field(gt=0, le=100_000)]
    telemetry_hz: Annotated[float, Field(ge=1, le=10)] = 2.0
    max_lease_s: Annotated[float, Field(gt=0, le=MAX_LEASE_S)] = 60.0
    # A lease's seq (the controller's wall clock in ms) must be within this of ours.
    seq_window_s: Annotated[float, Field(ge=60, le=86_400)] = 600.0
    # None is fine for the in-process link (demo, simulator); `rackpower agent` (MQTT)
    # refuses it: see auth_problem.
    auth: AgentAuth | None = None
    mqtt: AgentMqttConfig
    nvml: NvmlSettings = NvmlSettings()


def auth_problem(cfg: AgentConfig) -> Problem | None:
    """Why this config may not run on an MQTT link, or None.

    The model itself accepts a missing ``auth`` because the in-process link (the demo
    without ``--mqtt``, the simulator) carries leases between tasks of one process that
    nobody else can reach. On a broker, a missing key is refused unless the file says
    ``auth: {allow_unsigned: true}``: secure by default, insecure only by a written choice.
    """
    if cfg.auth is not None:
        return None
    return Problem(
        "auth",
        "no auth.key_file: over MQTT this agent would obey unsigned leases from anyone on the"
        " broker; set auth.key_file (docs/agent-link.md) or, for a lab only,"
        " auth: {allow_unsigned: true}",
    )


def parse_agent_config(data: Any, source: str = "<agent config>") -> AgentConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the file must be a mapping (key: value) at top")])
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, pydantic_problems(exc)) from None


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent file; every error names the file and the key path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [Problem("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(p), [Problem(where, f"not valid YAML: {problem}")]) from None
    return parse_agent_config(data, str(p))
