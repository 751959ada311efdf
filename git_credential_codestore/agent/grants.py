"""The grant store: narrow, revocable permissions the agent mints tokens under.

A grant is what a sandbox holds instead of the org key. The secret is shown once, at
creation; the store keeps only its SHA-256 (the secret is 256 random bits, so a fast
hash is enough: there is nothing to brute-force). The store is one JSON file, mode
0600 in a 0700 directory, rewritten atomically on every create and revoke, so a
revocation survives a restart of the agent. Use counts are flushed lazily: losing a few
on a crash loses no security.

Secrets look like `csg_<id>_<random>`: the id lets the agent find the record in O(1)
and lets a human tell which grant a leaked secret belongs to without revealing it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets as pysecrets
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError
from ..files import write_atomic
from ..secrets import Secret

SECRET_PREFIX = "csg_"
STORE_VERSION = 1


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def grant_id_of(secret: str) -> str | None:
    """The id embedded in a grant secret, or None when it is not shaped like one."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    gid, sep, rest = secret[len(SECRET_PREFIX):].partition("_")
    if not sep or not rest or not gid.isalnum() or len(gid) > 32:
        return None
    return gid


@dataclass
class Grant:
    id: str
    secret_sha256: str
    repos: list[str]
    scopes: list[str]
    max_ttl: int
    sub: str
    created_at: int
    expires_at: int | None = None
    ephemeral_only: bool = False
    refs: list[list[object]] = field(default_factory=list)
    own_socket: bool = False
    revoked_at: int | None = None
    uses: int = 0
    refusals: int = 0
    last_use: int | None = None

    @property
    def label(self) -> str:
        return f"grant {self.id}"

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self) -> dict[str, object]:
        """Everything but the secret's hash: what `grant list` and status show."""
        d = asdict(self)
        d.pop("secret_sha256")
        d["state"] = self.state()
        return d


class GrantStore:
    """Grants kept in `<state_dir>/grants.json`; one agent per state directory (flock)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "grants.json")
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._dirty = False
        self._lock_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> GrantStore:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        fd = os.open(os.path.join(self.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another codestore agent already uses {self.state_dir}; "
                "stop it (codestore agent stop) or pass --state-dir"
            ) from None
        self._lock_fd = fd
        self._grants = self._load()
        return self

    def close(self) -> None:
        self.flush()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self) -> dict[str, Grant]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Refuse to start rather than forget revocations.
            raise ConfigError(f"cannot read the grant store {self.path} ({type(e).__name__}); fix or move it") from None
        try:
            return {g["id"]: Grant(**g) for g in raw["grants"]}
        except (KeyError, TypeError) as e:
            raise ConfigError(f"the grant store {self.path} is damaged ({type(e).__name__}); fix or move it") from None

    def _write(self) -> None:
        """Atomic rewrite; caller holds the lock."""
        data = {"version": STORE_VERSION, "grants": [asdict(g) for g in self._grants.values()]}
        write_atomic(self.path, json.dumps(data, indent=1), 0o600, fsync=True)
        self._dirty = False

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._write()

    # -- administration --------------------------------------------------------------

    def create(
        self,
        *,
        repos: Sequence[str],
        scopes: Sequence[str],
        max_ttl: int,
        sub: str | None = None,
        expires_at: int | None = None,
        ephemeral_only: bool = False,
        refs: Sequence[Sequence[object]] = (),
        own_socket: bool = False,
    ) -> tuple[Grant, Secret]:
        gid = pysecrets.token_hex(6)
        secret = f"{SECRET_PREFIX}{gid}_{pysecrets.token_urlsafe(32)}"
        grant = Grant(
            id=gid,
            secret_sha256=_hash(secret),
            repos=list(repos),
            scopes=list(scopes),
            max_ttl=max_ttl,
            sub=sub or f"codestore-grant:{gid}",
            created_at=int(time.time()),
            expires_at=expires_at,
            ephemeral_only=ephemeral_only,
            refs=[list(r) for r in refs],
            own_socket=own_socket,
        )
        with self._lock:
            self._grants[gid] = grant
            self._write()
        return grant, Secret(secret)

    def revoke(self, gid: str) -> Grant | None:
        with self._lock:
            grant = self._grants.get(gid)
            if grant is None:
                return None
            if grant.revoked_at is None:
                grant.revoked_at = int(time.time())
            # Durable before we answer: a revocation must survive a crash right after.
            self._write()
            return grant

    def all(self) -> list[Grant]:
        with self._lock:
            return list(self._grants.values())

    def get(self, gid: str) -> Grant | None:
        with self._lock:
            return self._grants.get(gid)

    # -- use ---------------------------------------------------------------------------

    def authenticate(self, secret: str) -> Grant | None:
        """The grant this secret belongs to (any state), or None when it matches none."""
        gid = grant_id_of(secret)
        if gid is None:
            return None
        with self._lock:
            grant = self._grants.get(gid)
        if grant is None or not hmac.compare_digest(grant.secret_sha256, _hash(secret)):
            return None
        return grant

    def record_use(self, grant: Grant, ok: bool) -> None:
        with self._lock:
            if ok:
                grant.uses += 1
                grant.last_use = int(time.time())
            else:
                grant.refusals += 1
            self._dirty = True
