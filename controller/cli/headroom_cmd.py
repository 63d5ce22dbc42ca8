"""``rackpower headroom`` and ``rackpower reserve``: the scheduler's side of the API.

A scheduler asks before it places work: it reads how much power a node may still take
(``GET /v1/headroom``), holds what the job needs (``POST /v1/reservations``) so that two
placements cannot both count on the same watts, and releases the hold once the job draws
power and the meters see it (``DELETE /v1/reservations/ID``). These two commands are
that exchange for shell hooks (a Slurm ``PrologSlurmctld``, a Kubernetes init step):
one line of output a script can capture, and exit codes it can branch on.

Exit codes (the same for both commands):

- 0: done (headroom shown, reservation granted or released);
- 1: the controller said no or could not be asked: 409 not enough headroom (the reason
  on stderr), an unknown or expired reservation on ``--release``, 401/503 from the API,
  the controller unreachable. ``--fail-open`` turns "unreachable" into 0 with a warning,
  for sites that would rather start a job than stall the queue when the controller is down;
- 2: bad input: arguments, a URL without a scheme, a token variable that is unset, a node
  the site does not have (404) or a request the API rejects as malformed (422).

The token is never an argument (it would show in ``ps``): ``--token-env VAR`` names the
environment variable that holds it (default ``RACKPOWER_TOKEN``), or ``--token-file``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_ENV = "RACKPOWER_TOKEN"
KINDS = ("feed", "sst", "bus", "row", "rack", "node")

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """A failure with its exit code; the message goes to stderr as it is."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(CommandError):
    """The controller could not be asked (connection, timeout): ``--fail-open`` may pass it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_REFUSED)


# ---------------------------------------------------------------------------
# Arguments


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("RACKPOWER_URL", DEFAULT_URL),
        help=f"controller API base URL (default: $RACKPOWER_URL or {DEFAULT_URL})",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the API")


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "headroom",
        help="print the power headroom a running controller can give",
        description=(
            "Read /v1/headroom of a running controller: per node its envelope, measured"
            " power, reserved power, headroom, and available power (the least headroom"
            " from the node up to the feed: what a reservation there can get)."
        ),
        epilog="Exit codes: 0 shown, 1 controller unreachable or refusing, 2 bad input.",
    )
    _url_arg(p)
    p.add_argument("--node", help="only this node (a rack, row, GPU server, ...)")
    p.add_argument(
        "--down-to",
        choices=KINDS,
        default="node",
        help="deepest level to list without --node (default: node, the GPU servers)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    p.set_defaults(handler=cmd_headroom)

    r = sub.add_parser(
        "reserve",
        help="hold power under a node for a job about to start, or release a hold",
        description=(
            "Ask a running controller to hold WATTS under NODE for TTL seconds for JOB"
            " (POST /v1/reservations); prints the reservation id. --release ID gives a"
            " hold back early (DELETE /v1/reservations/ID), e.g. once the job draws power."
        ),
        epilog=(
            "Exit codes: 0 granted/released, 1 refused (not enough headroom, unknown"
            " reservation) or controller unreachable, 2 bad input."
        ),
    )
    _url_arg(r)
    r.add_argument("--node", help="tree node id to reserve under")
    r.add_argument("--watts", type=float, help="power to hold, W")
    r.add_argument("--ttl", type=float, help="seconds until the hold expires by itself")
    r.add_argument("--job", help="job id the hold is for (shown in the audit trail)")
    r.add_argument("--release", metavar="ID", help="release reservation ID instead")
    r.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding the API token (default: {DEFAULT_TOKEN_ENV})",
    )
    r.add_argument("--token-file", type=Path, help="read the API token from this file instead")
    r.add_argument(
        "--fail-open",
        action="store_true",
        help="exit 0 with a warning (and no id) when the controller cannot be reached",
    )
    r.add_argument("--json", action="store_true", help="print the API's JSON answer")
    r.set_defaults(handler=cmd_reserve)


# ---------------------------------------------------------------------------
# Talking to the API


@dataclass(frozen=True)
class ReserveRequest:
    node: str
    watts: float
    ttl_s: float
    job_id: str

    def body(self) -> dict[str, Any]:
        return {"node": self.node, "watts": self.watts, "ttl_s": self.ttl_s, "job_id": self.job_id}


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--url must start with http:// or https://: {url!r}", EXIT_BAD_INPUT)
    return url


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CommandError(f"cannot read --token-file: {exc}", EXIT_BAD_INPUT) from exc
        if not token:
            raise CommandError(f"--token-file {args.token_file} is empty", EXIT_BAD_INPUT)
        return token
    token = os.environ.get(args.token_env, "").strip()
    if not token:
        raise CommandError(
            f"environment variable {args.token_env} (the API token) is not set", EXIT_BAD_INPUT
        )
    return token


def _detail(resp: httpx.Response) -> str:
    """The API's reason (``detail``), or the start of the body when it is not JSON."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # 422: FastAPI's list of field errors
        return "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', ())[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail) if detail is not None else resp.text[:200]


def _fail(resp: httpx.Response) -> CommandError:
    """Map an error answer to an exit code: the caller's fault is 2, a refusal 1."""
    code = EXIT_BAD_INPUT if resp.status_code in (400, 404, 422) else EXIT_REFUSED
    if resp.status_code == 404 and resp.request.method == "DELETE":
        code = EXIT_REFUSED  # expired or already released: nothing to give back
    return CommandError(f"{resp.status_code}: {_detail(resp)}", code)


def _send(client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        return client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise Unreachable(
            f"cannot reach the controller at {client.base_url}: {exc or type(exc).__name__}"
        ) from exc


def fetch_headroom(
    client: httpx.Client, node: str | None = None, down_to: str = "node"
) -> dict[str, Any]:
    params = {"node": node} if node is not None else {"down_to": down_to}
    resp = _send(client, "GET", "/v1/headroom", params=params)
    if resp.status_code != 200:
        raise _fail(resp)
    body: dict[str, Any] = resp.json()
    return body


def reserve(client: httpx.Client, req: ReserveRequest, token: str) -> dict[str, Any]:
    """The granted reservation (the API's JSON); a refusal raises with the API's reason."""
    resp = _send(
        client,
        "POST",
        "/v1/reservations",
        json=req.body(),
        headers={"Authorization": f"Bearer {token}"},
    )
    if resp.status_code == 201:
        body: dict[str, Any] = resp.json()
        return body
    if resp.status_code == 409:
        raise CommandError(f"refused: {_detail(resp)}", EXIT_REFUSED)
    raise _fail(resp)


def release(client: httpx.Client, reservation_id: str, token: str) -> dict[str, Any]:
    resp = _send(
        client,
        "DELETE",
        f"/v1/reservations/{reservation_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    if resp.status_code == 200:
        body: dict[str, Any] = resp.json()
        return body
    raise _fail(resp)


# ---------------------------------------------------------------------------
# Output


def _fmt_w(watts: float | None) -> str:
    if watts is None:
        return "-"
    for unit, scale in (("MW", 1e6), ("kW", 1e3)):
        if abs(watts) >= scale:
            return f"{watts / scale:.2f} {unit}"
    return f"{watts:.0f} W"


def render_headroom(body: dict[str, Any]) -> str:
    """A plain-text table (no colours: it is read by people and by ``awk`` alike)."""
    cols = ("node", "kind", "envelope", "power", "reserved", "headroom", "available")
    rows = [
        (
            n["id"],
            n["kind"],
            _fmt_w(n["envelope_w"]),
            _fmt_w(n["power_w"]),
            _fmt_w(n["reserved_w"]),
            _fmt_w(n["headroom_w"]),
            _fmt_w(n["available_w"]),
        )
        for n in body["nodes"]
    ]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    lines = []
    for r in (cols, *rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [v.rjust(w) for v, w in zip(r[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Handlers


def _error(cmd: str, exc: CommandError) -> int:
    print(f"rackpower {cmd}: {exc}", file=sys.stderr)
    return exc.code


def cmd_headroom(args: argparse.Namespace) -> int:
    try:
        with httpx.Client(base_url=_base_url(args.url), timeout=args.timeout) as client:
            body = fetch_headroom(client, args.node, args.down_to)
    except CommandError as exc:
        return _error("headroom", exc)
    print(json.dumps(body, indent=2) if args.json else render_headroom(body))
    return EXIT_OK


def _reserve_request(args: argparse.Namespace) -> ReserveRequest:
    missing = [f"--{n}" for n in ("node", "watts", "ttl", "job") if getattr(args, n) is None]
    if missing:
        raise CommandError(
            f"{', '.join(missing)} required (or --release ID to give a hold back)", EXIT_BAD_INPUT
        )
    for name in ("watts", "ttl"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise CommandError(f"--{name} must be a positive number, not {value}", EXIT_BAD_INPUT)
    return ReserveRequest(node=args.node, watts=args.watts, ttl_s=args.ttl, job_id=args.job)


def cmd_reserve(args: argparse.Namespace) -> int:
    try:
        if args.release is not None:
            given = [n for n in ("node", "watts", "ttl", "job") if getattr(args, n) is not None]
            if given:
                raise CommandError(
                    f"--release takes no {', '.join('--' + n for n in given)}", EXIT_BAD_INPUT
                )
            req = None
        else:
            req = _reserve_request(args)
        url = _base_url(args.url)
        token = _token(args)
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            if req is None:
                body = release(client, args.release, token)
            else:
                body = reserve(client, req, token)
    except Unreachable as exc:
        if args.fail_open:
            print(f"rackpower reserve: warning: {exc}; going ahead (--fail-open)", file=sys.stderr)
            return EXIT_OK
        return _error("reserve", exc)
    except CommandError as exc:
        return _error("reserve", exc)
    if args.json:
        print(json.dumps(body, indent=2))
    elif req is None:
        print(f"released {body['id']}: {_fmt_w(body['watts'])} under {body['node']}")
    else:
        print(body["id"])  # alone on stdout: RID=$(rackpower reserve ...)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m controller.cli.headroom_cmd reserve ...``) for hosts
    where only the client is installed, and for tests that run the shipped scripts."""
    parser = argparse.ArgumentParser(prog="rackpower")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
