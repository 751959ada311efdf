"""The grant store: narrow, revocable permissions the agent mints tokens under.

A grant is what a sandbox holds instead of the org key. The secret is shown once, at
creation; the store keeps only its SHA-256 (the secret is 256 random bits, so a fast
hash is enough: there is nothing to brute-force).

Grants live in the agent's database (`db.py`: SQLite in a 0700 state dir, or PostgreSQL
shared by replicas). Create and revoke are one committed transaction each, with their
audit row; only then does memory change and the caller hear "done". Minting reads a
cache of the grants in use, kept honest by a poll of the rows changed since the last
one (`seq`, a number every create and revoke takes, in commit order), every
POLL_INTERVAL; when the store has not answered for STALE_AFTER, every grant is treated
as unknown and nothing is minted under it. Use counts are added in batches
(`uses = uses + n`, row by row): losing a second of them on a crash loses no security,
and no grant's row is rewritten for another's use.

Secrets look like `csg_<id>_<random>`: the id lets the agent find the record in O(1)
and lets a human tell which grant a leaked secret belongs to without revealing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets as pysecrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

from .. import jsontext
from ..errors import ConfigError, redact
from ..files import open_regular
from ..secrets import Secret
from . import db
from .db import Database, StoreError, Tx

SECRET_PREFIX = "csg_"
STORE_VERSION = 1


_EPOCH = 1 << 40  # seconds: a time past it (year 36812) is no time codestore wrote


def _legacy_grant(entry: object) -> Grant:
    """One entry of an old grants.json as a Grant, checked as `grant create` checks its terms;
    ValueError or TypeError (or ConfigError) naming the field otherwise."""
    from .policy import is_sub, parse_terms

    if not isinstance(entry, dict):
        raise TypeError("is not an object")
    gid, digest = entry.get("id"), entry.get("secret_sha256")
    if not (isinstance(gid, str) and 0 < len(gid) <= 32 and all(c in "0123456789abcdef" for c in gid)):
        raise ValueError("has an id that is not a grant id codestore made (hex)")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"({gid}) has no secret_sha256 (64 hex digits)")
    terms = parse_terms({k: entry[k] for k in ("repos", "scopes", "max_ttl", "ephemeral_only", "refs") if k in entry})

    def when(name: str, default: int | None = None) -> int | None:
        value = entry.get(name, default)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _EPOCH):
            raise ValueError(f"({gid}): its {name} is not a time in epoch seconds")
        return value

    def count(name: str) -> int:
        value = entry.get(name, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62):
            raise ValueError(f"({gid}): its {name} is not a count")
        return value

    sub = entry.get("sub") or f"codestore-grant:{gid}"
    if not is_sub(sub):
        raise ValueError(f"({gid}) has a sub that is not short text without control characters")
    own_socket, per_minute = entry.get("own_socket", False), entry.get("max_per_minute")
    if not isinstance(own_socket, bool):
        raise ValueError(f"({gid}) has an own_socket that is not true or false")
    if per_minute is not None and not (isinstance(per_minute, int) and not isinstance(per_minute, bool) and 0 < per_minute <= 1_000_000):
        raise ValueError(f"({gid}) has a max_per_minute that is not 1..1000000")
    created = when("created_at", 0) or 0
    # Revoked in any spelling the old store may have left (a string, true): revoked, at the
    # time it says, else at its creation (losing a revocation is the one loss that matters).
    revoked = entry.get("revoked_at")
    if revoked is not None and revoked is not False:
        revoked = when("revoked_at") if isinstance(revoked, int) and not isinstance(revoked, bool) else created
    else:
        revoked = None
    return Grant(
        id=gid, secret_sha256=digest, repos=tuple(terms.repos), scopes=tuple(terms.scopes), max_ttl=terms.max_ttl,
        sub=sub, created_at=created, expires_at=when("expires_at"), ephemeral_only=terms.ephemeral_only,
        refs=terms.refs, own_socket=own_socket, revoked_at=revoked,  # type: ignore[arg-type]
        uses=count("uses"), refusals=count("refusals"), last_use=when("last_use"), max_per_minute=per_minute,
    )


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


class _Read:
    """One request's read of a grant not cached (GrantStore.get): the others wait for it."""

    __slots__ = ("lock", "failed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed: StoreError | None = None


@dataclass(slots=True)
class Grant:
    """One grant. Slots and tuples: the cache holds up to CACHE_MAX of these for the life of
    the process, and the cyclic collector walks each tracked object in a full collection
    with the event loop stopped (100k grants: 126 ms as dicts and lists, 47 ms so)."""

    id: str
    secret_sha256: str
    repos: tuple[str, ...]
    scopes: tuple[str, ...]
    max_ttl: int
    sub: str
    created_at: int
    expires_at: int | None = None
    ephemeral_only: bool = False
    refs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    own_socket: bool = False
    revoked_at: int | None = None
    uses: int = 0
    refusals: int = 0
    last_use: int | None = None
    max_per_minute: int | None = None
    seq: int = 0

    def __post_init__(self) -> None:
        # From JSON (the store's columns, the old grants.json) they come as lists.
        self.repos, self.scopes = tuple(self.repos), tuple(self.scopes)
        self.refs = tuple((str(r[0]), tuple(str(o) for o in r[1])) for r in self.refs)

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
        d.pop("seq")
        d["state"] = self.state()
        return d


def _one_more() -> int:
    return 1


POLL_INTERVAL = 0.2  # how often a replica looks for grants changed by another
STALE_AFTER = 1.0  # a replica that has not heard from the store for this long mints nothing
FLUSH_INTERVAL = 1.0  # buffered audit rows (and use counts, every COUNTS_EVERY)
# Seconds between the flush thread's writes of use counts. Each grant used since the last
# write is a row rewritten, and its page: with 1000 grants in use (of 100k), writing them
# every second cost 10-15% of a replica's throughput (bench/fleet.py's 100k loads). Use
# counts decide nothing; a `grant list` asked of the replica holding some writes them first.
COUNTS_EVERY = 5.0
CACHE_MAX = 100_000
# Grants' use counts a flush transaction, on SQLite. Right after a load, with two workers, a
# `grant create` waited behind a flush transaction of each: chunks of 100 (and audit rows
# by 500) took 20-95 ms each there, and a create's p99 was 40-175 ms; with 25 (and 100),
# 4-57 ms, and the same throughput (bench/fleet.py).
FLUSH_CHUNK = 25
MAX_FLUSH_TRANSACTIONS = 200  # a flush's; what is left goes with the next one
FLUSH_PAUSE = 0.001  # seconds between a flush's transactions: at least db.py's longest poll step (POLL_MAX)
# The flush thread's steps spread their transactions over this share of FLUSH_INTERVAL, at
# most FLUSH_PAUSE_MAX apart (see _flush).
FLUSH_SPREAD = 0.75
FLUSH_PAUSE_MAX = 0.02
PAGE_MAX = 1000
STATES = ("active", "revoked", "expired")

db.register("grants", [
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        repos TEXT NOT NULL,
        scopes TEXT NOT NULL,
        max_ttl INTEGER NOT NULL,
        sub TEXT NOT NULL,
        created_at {bigint} NOT NULL,
        expires_at {bigint},
        ephemeral_only INTEGER NOT NULL DEFAULT 0,
        refs TEXT NOT NULL DEFAULT '[]',
        own_socket INTEGER NOT NULL DEFAULT 0,
        revoked_at {bigint},
        uses {bigint} NOT NULL DEFAULT 0,
        refusals {bigint} NOT NULL DEFAULT 0,
        last_use {bigint},
        max_per_minute INTEGER,
        seq {bigint} NOT NULL
    );
    CREATE INDEX grants_seq ON grants (seq);
    CREATE INDEX grants_sub ON grants (sub, created_at, id);
    CREATE INDEX grants_created ON grants (created_at, id);
    CREATE TABLE grant_repos (
        pattern TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants (id),
        PRIMARY KEY (pattern, grant_id)
    );
    -- One row: every create and revoke takes the next number, holding the row's lock
    -- until it commits, so numbers become visible in order and a poll misses none.
    CREATE TABLE grant_changes (id INTEGER PRIMARY KEY, seq {bigint} NOT NULL);
    INSERT INTO grant_changes (id, seq) VALUES (1, 0);
    CREATE TABLE grant_rate (
        grant_id TEXT NOT NULL,
        minute {bigint} NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (grant_id, minute)
    )
    """,
])

_COLUMNS = tuple(f.name for f in fields(Grant))
# Their SQL types, in that order, for writing many rows at once (db.Tx.execute_rows).
_TYPES = ("text", "text", "text", "text", "integer", "text", "bigint", "bigint", "integer", "text", "integer",
          "bigint", "bigint", "bigint", "bigint", "integer", "bigint")
_JSON = frozenset({"repos", "scopes", "refs"})
_BOOL = frozenset({"ephemeral_only", "own_socket"})
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM grants"


def _row(grant: Grant) -> tuple[object, ...]:
    out: list[object] = []
    for name in _COLUMNS:
        value = getattr(grant, name)
        out.append(json.dumps(value) if name in _JSON else int(value) if name in _BOOL else value)
    return tuple(out)


def _grant(row: Sequence[object]) -> Grant:
    """The grant in a row of the store; StoreError naming it when the row cannot be read (a
    column edited by hand, a disk's damage): that grant is refused, not every other."""
    try:
        values = {}
        for name, value in zip(_COLUMNS, row, strict=False):
            values[name] = jsontext.loads(value) if name in _JSON else bool(value) if name in _BOOL else value  # type: ignore[arg-type]
        return Grant(**values)  # type: ignore[arg-type]
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise StoreError(f"the grant store's row of grant {str(row[0])[:32]!r} is damaged ({type(e).__name__}); "
                         "nothing is minted under it: revoke it, or restore the store from a backup") from None


_SEQ = _COLUMNS.index("seq")


class GrantStore:
    """Grants in the agent's database, with a cache of those in use (see the module doc)."""

    def __init__(self, state_dir: str, store_url: str | None = None) -> None:
        self.state_dir = state_dir
        self.legacy_path = os.path.join(state_dir, "grants.json")
        self.db = Database(store_url or os.path.join(state_dir, db.DB_FILE))
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._flushes = 0  # flushes ended, and how the last one failed (None: it did not)
        self._flush_waiters = 0  # flushes waiting for the one in progress (which then stops spreading)
        self._flush_failed: StoreError | None = None
        self._cache: dict[str, Grant] = {}
        # Cached grants replaced (a change: a revocation, another replica's change taken in)
        # or evicted. While it stands still, every grant object read from the cache is still
        # the cache's: what was decided under one holds (Agent.decide). Read it before the
        # lookup it vouches for; _remember raises it after the cache is written.
        self.replaced = 0
        self._reading: dict[str, _Read] = {}  # grant id -> the read in progress (get)
        self._file: tuple[int, int] | None = None  # the SQLite file opened (_check_file)
        self._moved = ""  # why creates are refused: the file was moved or replaced under the agent
        self._seq = 0
        self._fresh_until = 0.0
        self._last_error = ""
        self._pending: dict[str, list[int]] = {}  # id -> [uses, refusals, last_use]
        self._counts_due = 0.0  # when the flush thread next writes use counts (time.monotonic())
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self.errors = 0  # store operations that failed, for /metrics
        self.reads = 0  # grants read from the store on a cache miss, for /metrics
        # Adds its rows to a flush's transaction (at most a chunk; between its statements it
        # calls `tx.pace`); the callback, called once it committed, says how many more
        # transactions its rows left need (0: none).
        self.on_flush: Callable[[Tx], Callable[[], int]] = lambda tx: lambda: 0
        # Told of every grant the poll finds changed (by this process or another): the
        # daemon closes a revoked grant's own socket wherever it was revoked.
        self.on_change: Callable[[Grant], None] = lambda grant: None

    @property
    def where(self) -> str:
        return self.db.where

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> GrantStore:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
            fd = os.open(os.path.join(self.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except NotADirectoryError:
            raise ConfigError(f"the state dir {self.state_dir} is a file; pass --state-dir DIR") from None
        except OSError as e:
            raise ConfigError(f"cannot use the state dir {self.state_dir} ({e.strerror}); pass --state-dir DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another codestore agent already uses {self.state_dir}; "
                "stop it (codestore agent stop) or pass --state-dir"
            ) from None
        self._lock_fd = fd
        try:
            self.db.open()
            self._migrate_json()
            with self.db.transaction(write=False) as tx:
                seq = tx.execute("SELECT seq FROM grant_changes WHERE id = 1")
            if not seq:  # every create and revoke numbers itself from this row (_next_seq)
                raise ConfigError(f"the grant store {self.db.where} is damaged (its change counter is gone); "
                                  "restore it from a backup, or move it away for a new one")
            self._seq = int(seq[0][0])  # type: ignore[call-overload]
        except StoreError as e:
            self.close(flush=False)
            raise ConfigError(f"cannot start: {e}") from None
        except BaseException:
            self.close(flush=False)
            raise
        try:
            with self.db.transaction() as tx:  # a write that changes nothing: does the store take writes?
                tx.execute("UPDATE grant_changes SET seq = seq WHERE id = 1")
        except StoreError as e:
            self.close(flush=False)
            raise ConfigError(f"cannot start: the store takes no writes ({e}), so no grant could be created or revoked; "
                              "make it writable, or point --store at one that is") from None
        except BaseException:
            self.close(flush=False)
            raise
        self._fresh_until = time.monotonic() + STALE_AFTER
        self._file = self._file_id()
        return self

    def _file_id(self) -> tuple[int, int] | None:
        """SQLite: the store file's (device, inode) at its path now; None for PostgreSQL, or if gone."""
        if self.db.dialect != "sqlite":
            return None
        try:
            st = os.stat(self.db.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        """A store file moved or replaced under the agent: its connections still write to the
        moved file, so a grant created now would be gone at the next start, with nothing said.
        From then on creates are refused and /readyz says why (`healthy`)."""
        if self._file is None or self._moved:
            return
        if self._file_id() != self._file:
            self._moved = (f"the grant store file {self.db.path} was moved or replaced while the agent ran; restart the agent "
                           "(grants created or revoked since went to the moved file)")
            print(f"codestore agent: {self._moved}", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Follow changes made by other replicas and flush use counts, in the background.

        Two threads: the poll must never wait behind a flush (a slow flush would make the
        view stale and refuse every grant), and a flush may take a while under load.
        """
        self._thread = threading.Thread(target=self._run, name="grant-sync", daemon=True)
        self._thread.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="grant-flush", daemon=True)
        self._flusher.start()

    def close(self, flush: bool = True) -> None:
        """Stop the threads, write what is buffered (`flush`: not when the store did not open,
        which asked a store that is away for another connect's timeout), close."""
        self._stop.set()
        for t in (self._thread, self._flusher):
            if t is not None:
                t.join(5)
        self._thread = self._flusher = None
        try:
            if flush:
                self.flush()
        except StoreError:
            pass  # the counts are lost, the grants are not: they were committed when made
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _migrate_json(self) -> None:
        """Import the JSON store of earlier versions once, losing nothing (revocations above all).

        Each entry is checked as `grant create` checks its request (_legacy_grant): an entry
        the old store never wrote (a mistyped field, an id no admin call can address, a path
        in it) failed later and everywhere: a TypeError for every `grant list`, a grant that
        mints and can never be revoked, a socket path that stopped every replica's start. An
        id twice is one grant, revoked if either entry is (the old store kept the last)."""
        try:
            with open_regular(self.legacy_path, "the old grant store") as f:
                raw = jsontext.loads(f.read())
            entries = raw["grants"]
            if not isinstance(entries, list):
                raise TypeError("grants is not a list")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # any shape but a list of grants
            raise ConfigError(f"cannot migrate the old grant store {self.legacy_path} ({type(e).__name__}); fix or move it") from None
        merged: dict[str, Grant] = {}
        for n, entry in enumerate(entries):
            try:
                grant = _legacy_grant(entry)
            except (ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"cannot migrate the old grant store {self.legacy_path}: its grant #{n + 1} {e}; fix or move it") from None
            earlier = merged.get(grant.id)
            if earlier is not None and grant.revoked_at is None:
                grant.revoked_at = earlier.revoked_at
            merged[grant.id] = grant
        grants = list(merged.values())
        with self.db.transaction() as tx:
            for grant in grants:
                if tx.execute("SELECT 1 FROM grants WHERE id = ?", (grant.id,)):
                    continue  # imported before a crash that kept the old file
                grant.seq = self._next_seq(tx)
                self._insert(tx, grant)
        os.replace(self.legacy_path, self.legacy_path + ".migrated")

    # -- writes: committed before they are acknowledged ----------------------------------

    @staticmethod
    def _next_seq(tx: Tx) -> int:
        return int(tx.execute("UPDATE grant_changes SET seq = seq + 1 WHERE id = 1 RETURNING seq")[0][0])  # type: ignore[call-overload]

    @staticmethod
    def _insert(tx: Tx, grant: Grant) -> None:
        tx.execute(f"INSERT INTO grants ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", _row(grant))
        tx.executemany("INSERT INTO grant_repos (pattern, grant_id) VALUES (?, ?)", [(p, grant.id) for p in dict.fromkeys(grant.repos)])

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
        max_per_minute: int | None = None,
        audit: Callable[[Tx, Grant], None] = lambda tx, g: None,
    ) -> tuple[Grant, Secret]:
        """A new grant, durable when this returns; StoreError (and no grant) otherwise."""
        if self._moved:  # it would be in the moved file, not in the store the next start opens
            raise StoreError(self._moved, "the grant store is away")
        gid = pysecrets.token_hex(6)
        secret = f"{SECRET_PREFIX}{gid}_{pysecrets.token_urlsafe(32)}"
        grant = Grant(
            id=gid,
            secret_sha256=_hash(secret),
            repos=tuple(repos),
            scopes=tuple(scopes),
            max_ttl=max_ttl,
            sub=sub or f"codestore-grant:{gid}",
            created_at=int(time.time()),
            expires_at=expires_at,
            ephemeral_only=ephemeral_only,
            refs=refs,  # type: ignore[arg-type]
            own_socket=own_socket,
            max_per_minute=max_per_minute,
        )
        with self._counted(), self.db.transaction() as tx:
            grant.seq = self._next_seq(tx)
            self._insert(tx, grant)
            audit(tx, grant)
        self._remember(grant)
        return grant, Secret(secret)

    def revoke(self, gid: str, audit: Callable[[Tx, Grant], None] = lambda tx, g: None) -> Grant | None:
        """Revoke durably; None when no such grant. StoreError leaves the grant as it was."""
        with self._counted(), self.db.transaction() as tx:
            rows = tx.execute(f"{_SELECT} WHERE id = ?", (gid,))
            if not rows:
                return None
            try:
                grant = _grant(rows[0])
            except StoreError:
                # A damaged row (_grant) is revoked all the same: its columns the revocation needs are
                # plain numbers, and what it says of the rest is what it can read of them.
                row = rows[0]
                grant = Grant(id=gid, secret_sha256="", repos=(), scopes=(), max_ttl=0, sub=str(row[_COLUMNS.index("sub")]),
                              created_at=0, revoked_at=row[_COLUMNS.index("revoked_at")])  # type: ignore[arg-type]
            if grant.revoked_at is None:
                grant.revoked_at = int(time.time())
                grant.seq = self._next_seq(tx)
                tx.execute("UPDATE grants SET revoked_at = ?, seq = ? WHERE id = ?", (grant.revoked_at, grant.seq, gid))
            audit(tx, grant)
        self._remember(grant)
        return grant

    # -- reads ---------------------------------------------------------------------------

    def _remember(self, grant: Grant) -> None:
        """Into the cache, unless the cache already holds a newer version of it."""
        with self._lock:
            have = self._cache.get(grant.id)
            if have is not None and have.seq > grant.seq:
                return
            evict = have is None and len(self._cache) >= CACHE_MAX
            if evict:
                self._cache.pop(next(iter(self._cache)))
            self._cache[grant.id] = grant
            if have is not None or evict:
                self.replaced += 1

    def _forget(self, gid: str) -> None:
        """Out of the cache, and every decision remembered under it with it (`replaced`)."""
        with self._lock:
            if self._cache.pop(gid, None) is not None:
                self.replaced += 1

    def check(self) -> None:
        """Raise StoreError when this replica cannot vouch for its view of the grants."""
        if time.monotonic() > self._fresh_until:
            # Said to whoever asked, a sandbox included: not the database's address or the driver's
            # words (the owner reads them in the agent's log, `agent status` and /readyz on its socket).
            raise StoreError("the grant store is not answering; refusing to mint under a grant until it is back")

    def cached(self, gid: str) -> Grant | None:
        """The grant when this replica's cache holds it (no database query), else None."""
        with self._lock:
            return self._cache.get(gid)

    def get(self, gid: str) -> Grant | None:
        """The grant (any state) or None; StoreError when the store cannot be checked."""
        self.check()
        with self._lock:
            grant = self._cache.get(gid)
            if grant is not None:
                return grant
            # One read a grant at a time: requests for a grant not yet cached arrive together
            # (a sandbox's first fetch, a replica's first minute), and each read it again.
            reading = self._reading.setdefault(gid, _Read())
        try:
            with reading.lock:
                if reading.failed is not None:
                    # The read this one waited for failed on the store just now (a hung server
                    # held it for a whole deadline): asking again would wait as long again.
                    raise StoreError(str(reading.failed), reading.failed.public)
                with self._lock:
                    grant = self._cache.get(gid)  # read meanwhile by the request this one waited for
                    if grant is not None:
                        return grant
                    self.reads += 1  # a cache miss (codestore_agent_grant_reads_total)
                try:
                    with self._counted(), self.db.transaction(write=False) as tx:
                        rows = tx.execute(f"{_SELECT} WHERE id = ?", (gid,))
                except StoreError as e:
                    reading.failed = e
                    raise
                if not rows:
                    return None
                grant = _grant(rows[0])
                self._remember(grant)
        finally:
            with self._lock:
                if self._reading.get(gid) is reading and not reading.lock.locked():
                    del self._reading[gid]
        with self._lock:
            return self._cache.get(gid, grant)

    def authenticate(self, secret: str) -> Grant | None:
        """The grant this secret belongs to (any state), or None when it matches none."""
        gid = grant_id_of(secret)
        if gid is None:
            return None
        grant = self.get(gid)
        if grant is None or not hmac.compare_digest(grant.secret_sha256, _hash(secret)):
            return None
        return grant

    def page(self, *, repo: str | None = None, sub: str | None = None, state: str | None = None,
             after: str | None = None, limit: int = 100, own_socket: bool | None = None) -> tuple[list[Grant], str | None]:
        """One page of grants in creation order, filtered; and the cursor of the next page."""
        self.flush()
        where: list[str] = []
        params: list[object] = []
        if repo is not None:
            where.append("id IN (SELECT grant_id FROM grant_repos WHERE pattern = ?)")
            params.append(repo)
        if sub is not None:
            where.append("sub = ?")
            params.append(sub)
        now = int(time.time())
        if state == "active":
            where.append("revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)")
            params.append(now)
        elif state == "revoked":
            where.append("revoked_at IS NOT NULL")
        elif state == "expired":
            where.append("revoked_at IS NULL AND expires_at <= ?")
            params.append(now)
        if own_socket is not None:
            where.append("own_socket = ?")
            params.append(int(own_socket))
        if after:
            created, _, gid = after.partition(".")
            # ASCII only: "²".isdigit() is true and int() then raises; and a time that fits the column.
            if not (created.isascii() and created.isdigit() and len(created) <= 15 and gid.isascii() and gid.isalnum()):
                raise ConfigError(f"bad page cursor {after[:40]!r}; use the next_cursor a previous page printed")
            where.append("(created_at > ? OR (created_at = ? AND id > ?))")
            params += [int(created), int(created), gid]
        limit = max(1, min(limit, PAGE_MAX))
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY created_at, id LIMIT ?"
        with self.db.transaction(write=False) as tx:
            rows = tx.execute(sql, (*params, limit + 1))
        grants = [_grant(r) for r in rows[:limit]]
        cursor = f"{grants[-1].created_at}.{grants[-1].id}" if len(rows) > limit else None
        return grants, cursor

    def counts(self) -> dict[str, int]:
        now = int(time.time())
        with self.db.transaction(write=False) as tx:
            row = tx.execute(
                "SELECT COUNT(*), SUM(CASE WHEN revoked_at IS NOT NULL THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN revoked_at IS NULL AND expires_at <= ? THEN 1 ELSE 0 END) FROM grants", (now,))[0]
        total, revoked, expired = (int(v or 0) for v in row)  # type: ignore[call-overload]
        return {"active": total - revoked - expired, "revoked": revoked, "expired": expired}

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """A store call in the block, its StoreError counted in `errors`
        (codestore_agent_store_errors_total): each store call counts its own failure."""
        try:
            yield
        except StoreError:
            self.errors += 1
            raise

    # -- use -----------------------------------------------------------------------------

    def record_use(self, grant: Grant, ok: bool) -> None:
        with self._lock:
            p = self._pending.setdefault(grant.id, [0, 0, 0])
            if ok:
                p[0] += 1
                p[2] = int(time.time())
            else:
                p[1] += 1

    def take_rate(self, grant: Grant) -> int:
        """Count one mint against the grant's per-minute limit, across replicas; the count."""
        minute = int(time.time()) // 60
        with self._counted(), self.db.transaction() as tx:
            rows = tx.execute(
                "INSERT INTO grant_rate (grant_id, minute, count) VALUES (?, ?, 1) "
                "ON CONFLICT (grant_id, minute) DO UPDATE SET count = grant_rate.count + 1 RETURNING count",
                (grant.id, minute))
            if int(rows[0][0]) == 1:  # type: ignore[call-overload]
                # A new minute: the grant's earlier ones are never read again. Without this
                # a grant in use all year left half a million rows behind.
                tx.execute("DELETE FROM grant_rate WHERE grant_id = ? AND minute < ?", (grant.id, minute))
        return int(rows[0][0])  # type: ignore[call-overload]

    def flush(self, *, counts: bool = True, until: float | None = None) -> None:
        """Write pending use counts (unless `counts` is False) and what `on_flush` adds, its
        transactions spread until `until` (time.monotonic()) if given: see _flush."""
        # One flush at a time (the flush thread's, an audit query's, close()'s): two running
        # together would both be handed the same buffered audit rows and write them twice.
        ended = self._flushes
        with self._lock:
            self._flush_waiters += 1
        with self._flushing:
            with self._lock:
                self._flush_waiters -= 1
            failed = self._flush_failed
            if failed is not None and self._flushes != ended:
                # The flush this one waited for failed on the store just now (a hung server
                # held it for a whole deadline): asking again would wait as long again.
                raise StoreError(str(failed), failed.public)
            try:
                self._flush(counts, until)
            except StoreError as e:
                self._flush_failed = e
                raise
            else:
                self._flush_failed = None
            finally:
                self._flushes += 1

    def _flush(self, counts: bool, until: float | None) -> None:
        """On SQLite, small transactions: a transaction holds the one write lock, and a
        `grant create` waits for it. Use counts of 1000 grants scattered over a 100k-grant
        table rewrite about a thousand pages: 140-300 ms in one transaction under load, so a
        create waited that long; a chunk takes a fraction. On PostgreSQL, which locks rows, the
        use counts in one transaction and the audit rows in the next: nothing else waits for
        them, and they take fewer round trips.

        The flush thread's work is spread evenly until `until`, unless another flush is
        waiting for this one or the store is closing: SQLite's transactions at most
        FLUSH_PAUSE_MAX apart (_paused), PostgreSQL's audit COPYs within their transaction
        (_pace), which is why the counts, whose rows it locks, come first on their own.
        Back to back, a second's 130 SQLite transactions (a closed loop's 13k audit rows)
        took the first 350 ms of each second, and the thread's CPU and its turns at the GIL
        slowed the event loop by 40% meanwhile: the tokens in flight then were the closed
        loop's slowest 1%.
        """
        with self._lock:
            pending, self._pending = (self._pending, {}) if counts else ({}, self._pending)
        # In id order: two replicas updating the same grants lock their rows in one order, never
        # in each other's (a deadlock PostgreSQL would break by failing one of them).
        left = [(u, r, t, gid) for gid, (u, r, t) in sorted(pending.items())]
        per = FLUSH_CHUNK if self.db.one_writer else max(1, len(left))
        try:
            for _ in range(MAX_FLUSH_TRANSACTIONS):  # rows arriving meanwhile wait for the next flush
                chunk = left[:per]
                began = time.monotonic()
                with self.db.transaction(durable=False) as tx:
                    if chunk:
                        # Many grants a statement (db.Tx.execute_rows says why and how).
                        tx.execute_rows(
                            "UPDATE grants SET uses = grants.uses + v.column1, refusals = grants.refusals + v.column2, "
                            "last_use = CASE WHEN v.column3 = 0 THEN grants.last_use "
                            "WHEN grants.last_use IS NULL OR grants.last_use < v.column3 THEN v.column3 ELSE grants.last_use END "
                            "FROM {rows} WHERE grants.id = v.column4",
                            ("bigint", "bigint", "bigint", "text"),
                            chunk,
                        )
                    if chunk and not self.db.one_writer:
                        # PostgreSQL: the audit rows in a transaction of their own, next: its
                        # pauses (_pace) then hold no grant's row lock, which a revocation on
                        # another replica would wait for.
                        committed = _one_more
                    else:
                        if not self.db.one_writer:
                            tx.pace = self._pace(until)
                        committed = self.on_flush(tx)
                del left[:per]
                more = max(committed(), -(-len(left) // per))  # transactions still to come
                ended = time.monotonic()
                self.db.sync_log()  # the transaction to disk, outside the lock (db.transaction says why)
                if not more:
                    break
                # A writer waiting now gets in: a thread of this process (a lock does not
                # hand over to a waiter by itself) or another process (polling, db.py).
                time.sleep(max(0.0, self._paused(began, ended, more, until) - time.monotonic()))
        except BaseException as e:
            # Keep them for the next try, whatever failed (the store, or a driver's encoding
            # error, or a bug, which the flush thread reports): nothing counted is dropped.
            if isinstance(e, StoreError):
                self.errors += 1
            with self._lock:
                for u, r, t, gid in left:
                    p = self._pending.setdefault(gid, [0, 0, 0])
                    p[0] += u
                    p[1] += r
                    p[2] = max(p[2], t)
            raise

    def _pace(self, until: float | None) -> Callable[[int], None]:
        """Between the statements of a PostgreSQL flush transaction (audit.insert's COPYs):
        the `left` still to come spread until `until`, at most FLUSH_PAUSE_MAX apart, unless
        another flush is waiting for this one or the store is closing.

        A second's 14k audit rows sent back to back were 100-200 ms of the server's CPU at
        once, and of the flush thread's, each second. With the server on the agent's two
        cores, the event loop then had half a core, and the tokens in flight meanwhile
        were the closed loop's slowest 1% (bench/fleet.py, docs/fleet.md). On SQLite a
        flush transaction is one such statement, and holds the one write lock."""

        def pace(left: int) -> None:
            if until is None or not left or self._flush_waiters or self._stop.is_set():
                return
            self._stop.wait(min(FLUSH_PAUSE_MAX, max(0.0, (until - time.monotonic()) / (left + 1))))

        return pace

    def _paused(self, began: float, ended: float, more: int, until: float | None) -> float:
        """When the next flush transaction starts, after one from `began` to `ended`: the
        `more` still to come evenly spaced until `until`, each taking about as long."""
        pause = FLUSH_PAUSE
        if until is not None and not self._flush_waiters and not self._stop.is_set():  # nobody waits for its end
            pause = min(FLUSH_PAUSE_MAX, max(FLUSH_PAUSE, (until - ended) / more - (ended - began)))
        return ended + pause

    # -- following other replicas ----------------------------------------------------------

    def sync(self) -> bool:
        """Take in every grant changed since the last sync (1000 at most); True, and the view
        marked fresh, when that was all of them."""
        # Fresh from when the query began, not when its answer was read: a revocation
        # committed after the snapshot must be seen within STALE_AFTER of it, however long
        # the answer took to arrive and be taken in.
        asked = time.monotonic()
        with self._counted(), self.db.transaction(write=False) as tx:
            rows = tx.execute(f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT 1000", (self._seq,))
        for row in rows:
            try:
                grant = _grant(row)
            except StoreError as e:
                # One damaged row stopped the poll, so every grant went stale and was refused as
                # "the store is not answering". That grant is forgotten (never minted under: a
                # read of it fails the same way), the others go on.
                self._forget(str(row[0]))
                self._seq = max(self._seq, int(row[_SEQ]))  # type: ignore[call-overload]
                print(f"codestore agent: {e}", file=sys.stderr, flush=True)
                continue
            self._remember(grant)
            self._seq = max(self._seq, grant.seq)
            self.on_change(grant)
        if len(rows) < 1000:
            self._fresh_until = asked + STALE_AFTER
            self._last_error = ""
            return True
        return False

    def catch_up(self) -> None:
        """Sync until nothing is left: a view of any age (a worker forked long after the
        parent read the store) is current when this returns."""
        self._fresh_until = 0.0
        while not self.sync():
            pass

    def _run(self) -> None:
        self._loop(POLL_INTERVAL, self.sync, "the grant poll")

    def _flush_loop(self) -> None:
        def step() -> None:
            now = time.monotonic()
            counts = now >= self._counts_due
            # Spread over most of the interval (_flush); a failed one raises: its counts are
            # written at the next step.
            self.flush(counts=counts, until=now + FLUSH_SPREAD * FLUSH_INTERVAL)
            if counts:
                self._counts_due = now + COUNTS_EVERY
            with self._counted():
                self.db.checkpoint()  # SQLite: here, so that no request's commit pays for one
                self.db.shrink_log()  # SQLite: once the store is quiet
            self._check_file()

        self._loop(FLUSH_INTERVAL, step, "the use-count flush", "; its counts are kept for the next one", paced=True)

    def _loop(self, interval: float, step: Callable[[], object], what: str, then: str = "", paced: bool = False) -> None:
        """`step` every `interval` seconds: after each step (`paced` False), or from the start of
        each (`paced`: a step that took the whole interval, a flush that fell behind, is followed
        by the next at once). A step that failed is followed by a whole interval either way: a
        store that just gave up on it is not asked again at once, and a request waiting to
        flush (an audit query) gets in and is told of the failure instead of waiting for
        another one."""
        said = ""  # a bug that repeats every step is said once, not every second
        started = time.monotonic()
        while not self._stop.wait(max(0.0, started + interval - time.monotonic()) if paced else interval):
            started = time.monotonic()
            try:
                step()
                said = ""
                continue
            except StoreError as e:  # counted where it happened (each store call counts its own)
                if not self._last_error:
                    print(f"codestore agent: {e}", file=sys.stderr, flush=True)
                self._last_error = str(e)
            except Exception as e:  # noqa: BLE001 - the thread must outlive any bug
                line = f"{what} failed ({' '.join(redact(repr(e)).split())[:200]}){then}"
                if line != said:
                    print(f"codestore agent: {line}", file=sys.stderr, flush=True)
                    said = line
            started = time.monotonic()  # failed: a whole interval from now

    @property
    def healthy(self) -> tuple[bool, str]:
        if time.monotonic() > self._fresh_until:
            return False, self._last_error or "the grant store is not answering"
        if self._moved:
            return False, self._moved
        failed = self._flush_failed
        if failed is not None:
            # It answers reads (minting goes on), but a revocation could not be written here.
            return False, f"the store took no write in the last flush ({failed}); grants cannot be created or revoked through this replica"
        return True, "ok"
