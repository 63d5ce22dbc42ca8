"""Per-agent message authentication for the agent link: HMAC-SHA256, one secret per agent.

Why HMAC and not Ed25519: leases go down and telemetry comes up, and both must be
authenticated per agent. With Ed25519 the agents could hold only the controller's public
key for leases, but telemetry would still need a key pair per agent and the controller
would still need every agent's public key: a key per agent either way. One shared secret
per agent covers both directions, costs about a microsecond (stdlib ``hmac``; the
controller seals hundreds of leases a second and opens thousands of reports), and a
stolen agent secret lets its thief speak only for that one agent, to and from the
controller, which root on that node can do anyway.

What is signed is exactly the bytes that are verified, in an envelope of fixed layout:
``{"kid":"<key id>","sig":"<base64url HMAC, 43 chars>","m":<the message JSON as is>}``.
It is valid JSON (tools can read it), but the receiver never parses it: it slices at
fixed places, checks the MAC over the bytes of ``m`` as received, and only then parses
``m``. No canonicalisation, no escaping, and a forgery costs a few slices and one MAC.
The MAC covers ``<kind> NUL <agent id> NUL <kid> NUL <m>``: ``kind`` (``lease`` or
``telemetry``) binds the direction, so a report an agent signed cannot be replayed to it
as a lease with the same secret; the agent id binds the recipient/sender, so a lease
sealed for agent A fails at agent B even if two agents were given one secret by mistake.
Nothing is parsed before the MAC checks out.

Key files hold one or two lines ``<kid> <secret hex, >= 32 bytes>`` (``#`` comments).
The first key seals; every key listed opens, so two keys are valid during a rollover.
A file must be readable only by its owner (mode 0600 or 0400): a group- or
world-readable file is refused at start with the reason. Files are re-read when they
change (mtime, size or inode, looked at no more than every ``check_every_s``) or on
:meth:`KeyFile.reload` (SIGHUP); a file that turns bad while running keeps the keys
already loaded, with an error in the log.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["lease", "telemetry"]
KIND_TAG: dict[str, bytes] = {
    "lease": b"rackpower-lease-v1",
    "telemetry": b"rackpower-telemetry-v1",
}
MIN_SECRET_BYTES = 32
MAX_KEYS = 2  # the current key and the one being rolled over
MAX_SEALED_BYTES = 256 * 1024  # far above any lease or report: never parse a giant blob
KID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SIG_LEN = 43  # base64url of 32 bytes, unpadded


class KeyFileError(ValueError):
    """A key file that cannot be used; ``str()`` names the file and the reason."""


class AuthError(ValueError):
    """A message that failed authentication (unsigned, unknown key, bad MAC)."""


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    secret: bytes = field(repr=False)


def new_key_line(kid: str = "k1") -> str:
    """A fresh ``kid secret`` line (the demo's throwaway keys, and ``rackpower`` docs)."""
    return f"{kid} {secrets.token_hex(MIN_SECRET_BYTES)}"


def write_key_file(path: Path, *lines: str) -> None:
    """Write a key file readable only by its owner (created 0600, never briefly wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.chmod(path, 0o600)


def parse_keys(text: str, source: str) -> tuple[Key, ...]:
    keys: list[Key] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyFileError(f"{source}: line {n}: expected '<kid> <secret hex>'")
        kid, hexsecret = parts
        if not KID_RE.match(kid):
            raise KeyFileError(f"{source}: line {n}: key id must be 1-64 of A-Z a-z 0-9 _ . : -")
        try:
            secret = bytes.fromhex(hexsecret)
        except ValueError:
            raise KeyFileError(f"{source}: line {n}: the secret is not hex") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(
                f"{source}: line {n}: secret is {len(secret)} bytes, at least "
                f"{MIN_SECRET_BYTES} needed (openssl rand -hex 32)"
            )
        if any(k.kid == kid for k in keys):
            raise KeyFileError(f"{source}: line {n}: key id {kid!r} twice")
        keys.append(Key(kid, secret))
    if not keys:
        raise KeyFileError(f"{source}: no key in the file")
    if len(keys) > MAX_KEYS:
        raise KeyFileError(f"{source}: {len(keys)} keys; at most {MAX_KEYS} (current, rolled over)")
    return tuple(keys)


def _stat_owner_only(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or change it;"
            " a key file must be readable only by its owner (chmod 600)"
        )
    return st


def load_keys(path: Path) -> tuple[tuple[Key, ...], tuple[int, int, int]]:
    """The keys in ``path`` and the (mtime_ns, size, inode) they were read at."""
    st = _stat_owner_only(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read: {exc}") from None
    return parse_keys(text, str(path)), (st.st_mtime_ns, st.st_size, st.st_ino)


class KeyFile:
    """One agent's keys from one file, re-read when it changes or on :meth:`reload`."""

    def __init__(
        self,
        path: Path | str,
        *,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._check_every_s = check_every_s
        self._clock = clock
        self._keys, self._sig = load_keys(self.path)  # a bad file stops the start here
        self._checked_s = clock()
        self.reloads = 0

    def current(self) -> tuple[Key, ...]:
        """The keys now valid (first seals); re-read first if the file changed."""
        now = self._clock()
        if now - self._checked_s >= self._check_every_s:
            self._checked_s = now
            self._maybe_reload()
        return self._keys

    def reload(self) -> None:
        """Re-read now (SIGHUP), whatever the file's mtime says."""
        self._checked_s = self._clock()
        self._maybe_reload(force=True)

    def _maybe_reload(self, force: bool = False) -> None:
        try:
            st = os.stat(self.path)
            if not force and (st.st_mtime_ns, st.st_size, st.st_ino) == self._sig:
                return
            keys, sig = load_keys(self.path)
        except (OSError, KeyFileError) as exc:
            log.error("key file %s not re-read, the keys loaded before stay: %s", self.path, exc)
            return
        if [k.kid for k in keys] != [k.kid for k in self._keys] or keys != self._keys:
            log.info("key file %s re-read: key ids %s", self.path, [k.kid for k in keys])
        self._keys, self._sig = keys, sig
        self.reloads += 1


def _check_keys_dir(path: Path) -> None:
    """The controller's keys directory: there, a directory, readable by us, by us alone.

    Every agent's secret is in it, so it gets the key files' own rule: a directory that
    others may list or write (group or world bits) is refused, as ssh refuses a loose
    ``~/.ssh``. Writable by others would let them plant a key for an agent that has none.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyFileError(
            f"{path}: agent keys directory cannot be read: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{path}: agent keys directory is not a directory")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others list or change the"
            " agents' key files; the keys directory must be its owner's alone (chmod 700)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise KeyFileError(f"{path}: agent keys directory cannot be read by this user")


class KeyStore:
    """The controller's keys for every agent: ``<keys_dir>/<agent_id>.key``, loaded lazily.

    One file per agent keeps rotation per agent (a node reinstalled gets a new secret
    without touching 8,999 others) and makes the ACL generator's job and an audit of who
    holds what a directory listing. A missing or bad file is re-looked-at no more than
    every ``check_every_s``; until it is there, that agent gets no lease (it stays at its
    failsafe cap) and its telemetry is refused.
    """

    def __init__(
        self,
        keys_dir: Path | str,
        *,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys_dir = Path(keys_dir)
        _check_keys_dir(self.keys_dir)  # a bad directory stops the start here
        self._check_every_s = check_every_s
        self._clock = clock
        self._files: dict[str, KeyFile] = {}
        self._missing: dict[str, tuple[float, str]] = {}  # agent -> (when looked, why)

    def path_for(self, agent_id: str) -> Path:
        return self.keys_dir / f"{agent_id}.key"

    def keys(self, agent_id: str) -> tuple[Key, ...] | None:
        """The agent's keys, or None if it has no usable key file (why: :meth:`problem`)."""
        kf = self._files.get(agent_id)
        if kf is not None:
            return kf.current()
        now = self._clock()
        missed = self._missing.get(agent_id)
        if missed is not None and now - missed[0] < self._check_every_s:
            return None
        try:
            kf = KeyFile(
                self.path_for(agent_id), check_every_s=self._check_every_s, clock=self._clock
            )
        except KeyFileError as exc:
            self._missing[agent_id] = (now, str(exc))
            return None
        self._missing.pop(agent_id, None)
        self._files[agent_id] = kf
        return kf.current()

    def problem(self, agent_id: str) -> str | None:
        missed = self._missing.get(agent_id)
        return None if missed is None else missed[1]

    def missing(self, agent_ids: Sequence[str]) -> list[str]:
        """The agents of ``agent_ids`` without a usable key file (checked now)."""
        for a in agent_ids:
            self._missing.pop(a, None)
        return [a for a in agent_ids if self.keys(a) is None]

    def reload(self) -> None:
        """Re-read every key file now (SIGHUP); missing ones are looked for again."""
        self._missing.clear()
        for kf in self._files.values():
            kf.reload()


# ---------------------------------------------------------------------------
# Sealing and opening


_HEAD = b'{"kid":"'
_MID = b'","sig":"'
_TAIL = b'","m":'


def seal(kind: Kind, agent_id: str, payload: bytes, key: Key) -> bytes:
    """The envelope for ``payload`` (a message's JSON) from or to ``agent_id``:
    ``{"kid":"k1","sig":"<43 chars>","m":<payload as is>}``, itself valid JSON."""
    kid = key.kid.encode()
    mac = hmac.digest(key.secret, _mac_input(kind, agent_id, kid, payload), "sha256")
    sig = base64.urlsafe_b64encode(mac)[:_SIG_LEN]
    return b"".join((_HEAD, kid, _MID, sig, _TAIL, payload, b"}"))


def _mac_input(kind: Kind, agent_id: str, kid: bytes, m: bytes) -> bytes:
    return b"\0".join((KIND_TAG[kind], agent_id.encode(), kid, m))


def is_sealed(data: bytes) -> bool:
    return data.startswith(_HEAD)


def unwrap(data: bytes) -> tuple[str, bytes, bytes]:
    """(kid, sig, inner payload) of an envelope in exactly the form :func:`seal` writes;
    AuthError if it is not one. Nothing is parsed: fixed offsets, so a forgery costs the
    receiver a few slices and one MAC."""
    if len(data) > MAX_SEALED_BYTES:
        raise AuthError(f"{len(data)} bytes, more than any signed message")
    if not data.startswith(_HEAD):
        raise AuthError("unsigned: not a signed envelope")
    mid = data.find(_MID, len(_HEAD), len(_HEAD) + 65)
    if mid < 0:
        raise AuthError("unsigned: not a signed envelope (kid, sig, m)")
    kid = data[len(_HEAD) : mid].decode("ascii", errors="replace")
    at = mid + len(_MID)
    sig = data[at : at + _SIG_LEN]
    at += _SIG_LEN
    if data[at : at + len(_TAIL)] != _TAIL or not data.endswith(b"}"):
        raise AuthError("unsigned: not a signed envelope (kid, sig, m)")
    return kid, sig, data[at + len(_TAIL) : -1]


def open_sealed(kind: Kind, agent_id: str, data: bytes, keys: Sequence[Key]) -> bytes:
    """The inner payload if ``data`` is sealed for ``kind`` and ``agent_id`` with one of
    ``keys``; AuthError saying why otherwise (and nothing of the payload is trusted)."""
    kid, sig, m = unwrap(data)
    key = next((k for k in keys if k.kid == kid), None)
    if key is None:
        shown = kid if KID_RE.match(kid) else "(invalid)"
        raise AuthError(f"signed with unknown key id {shown!r} (known: {[k.kid for k in keys]})")
    mac = hmac.digest(key.secret, _mac_input(kind, agent_id, key.kid.encode(), m), "sha256")
    if not hmac.compare_digest(base64.urlsafe_b64encode(mac)[:_SIG_LEN], sig):
        raise AuthError(
            f"bad signature with key {kid!r} (wrong key, altered, for another agent or"
            f" not a {kind})"
        )
    return m


class RefusalLog:
    """A warning for the first refusal, then at most one every ``every_s`` with a count:
    an attacker flooding forged messages must not flood the journal too."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._every_s = every_s
        self._clock = clock
        self._last_s: float | None = None
        self._suppressed = 0

    def refused(self, reason: str) -> None:
        now = self._clock()
        if self._last_s is not None and now - self._last_s < self._every_s:
            self._suppressed += 1
            return
        more = (
            f" ({self._suppressed} more refused since the last such line)"
            if self._suppressed
            else ""
        )
        self._log.warning("refused %s: %s; nothing of it used%s", self._what, reason, more)
        self._last_s = now
        self._suppressed = 0
