"""Addresses and URLs that cannot work, found when the config is checked instead of at run time.

A misspelt scheme, port 0 or 70000, an empty host or a stray space only shows when the
controller first connects: long after the engineer who wrote it left, and possibly as a
silent fall-back to "no BMS link". And a password written into a URL lands in every log
line and error message that prints the URL (F10), so userinfo is refused outright:
the config has ``username`` + ``password_env``/``password_file`` for that.

Every function returns a message (``None`` when all is well) that never contains the
userinfo of what it was given: callers may put it in an error as it is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from urllib.parse import SplitResult, urlsplit

CREDENTIALS_REFUSED = (
    "credentials in the URL are not allowed; use username + password_env/password_file"
)

# A DNS name (RFC 1123 labels) or an IPv4 literal; IPv6 literals come in brackets.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def host_problem(host: str) -> str | None:
    """Why ``host`` (a name, an IPv4 or a bracket-less IPv6 literal) cannot be connected to."""
    if not host:
        return "the host is empty"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return "the host is not a valid IPv6 address"
        return None
    if not _HOSTNAME.match(host):
        return "the host is not a valid host name or IP address"
    return None


def port_problem(port: int) -> str | None:
    if not 1 <= port <= 65535:
        return f"port {port} is outside 1-65535"
    return None


def url_problem(url: str, schemes: Collection[str], *, path_allowed: bool = False) -> str | None:
    """Why ``url`` cannot work as a ``scheme://host[:port]`` of one of ``schemes``."""
    if url != url.strip() or any(c.isspace() for c in url):
        return "the URL contains white space"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced bracket
        return f"not a URL ({exc})"
    want = ", ".join(f"{s}://" for s in schemes)
    if "@" in parts.netloc:
        return CREDENTIALS_REFUSED
    if "://" not in url:
        return f"not a URL; expected {want}host[:port]"
    if parts.scheme.lower() not in schemes:
        return f"scheme {parts.scheme + '://'!r} is not one of {want}"
    return _netloc_problem(parts) or _rest_problem(parts, path_allowed)


def _netloc_problem(parts: SplitResult) -> str | None:
    host = parts.hostname or ""
    if host_problem(host) is not None:
        return host_problem(host)
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number in 1-65535"
    return None if port is None else port_problem(port)


def _rest_problem(parts: SplitResult, path_allowed: bool) -> str | None:
    if parts.query or parts.fragment:
        return "a query or fragment (?, #) is not supported"
    if not path_allowed and parts.path not in ("", "/"):
        return "a path is not supported"
    return None


def address_problem(address: str) -> str | None:
    """Why a device ``host[:port]`` / ``[v6][:port]`` cannot work."""
    if "@" in address:
        return CREDENTIALS_REFUSED
    if address != address.strip() or any(c.isspace() for c in address):
        return "the address contains white space"
    if "://" in address:
        return "an address is host:port, without a scheme"
    if address.startswith("["):
        host, close, rest = address[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return "not host:port ([v6]:port for IPv6)"
        port_text = rest[1:] if rest else None
        if ":" not in host:
            return "only an IPv6 address goes in brackets"
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    elif address.count(":") > 1:
        return "an IPv6 address needs brackets: [v6]:port"
    else:
        host, port_text = address, None
    if host_problem(host) is not None:
        return host_problem(host)
    if port_text is None:
        return None
    if not port_text.isdigit():
        return "the port is not a number in 1-65535"
    return port_problem(int(port_text))
