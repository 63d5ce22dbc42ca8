"""Secrets come from the environment or a file, never from the config itself.

One rule for every integration (API token, InfluxDB token, MQTT password): a configured
source that is missing or empty stops the start with a message naming it, because a
service that silently runs unauthenticated fails later, at a worse moment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path


def read_secret(
    what: str,
    env_var: str | None,
    file: Path | str | None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The secret from ``env_var`` or ``file``; None when neither is configured.

    ``ValueError`` names ``what`` and the source when the source is configured but unset,
    unreadable or empty.
    """
    env = os.environ if environ is None else environ
    if env_var is not None:
        value = env.get(env_var, "").strip()
        if not value:
            raise ValueError(f"{what}: environment variable {env_var} is not set")
        return value
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {file}: {exc.strerror or exc}") from exc
        if not value:
            raise ValueError(f"{what}: {file} is empty")
        return value
    return None


# ``scheme://userinfo@`` or a bare ``userinfo@host`` at the start of an address; userinfo
# runs up to the last ``@`` before the host (a password may itself contain ``@``).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<userinfo>[^/?#\s]*)@")
_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")


def redact_url(url: str) -> str:
    """``url`` with any userinfo (``user:pass@``) replaced by ``***@``, for logs and errors.

    A password written into a URL must never reach a log line, an error message or a
    process list; whatever else the URL says stays readable so the message still helps.
    """
    m = _USERINFO.match(url)
    if m is None or not m.group("userinfo"):
        return url
    return f"{m.group('scheme') or ''}***@{url[m.end() :]}"


def redact_text(text: str) -> str:
    """Every ``scheme://user:pass@`` inside free text (an exception's repr) redacted."""
    return _USERINFO_IN_TEXT.sub(lambda m: f"{m.group('scheme')}***@", text)
