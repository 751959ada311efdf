"""The audit trail: one record per mint, refusal and grant change.

Records carry who (grant id, `sub`, peer), what (repo, namespace, scopes, TTL) and the
result or the reason for a refusal: never a token or a grant secret. The agent builds
entries from request fields it has already validated, and passes reasons through
`errors.redact` in case a caller managed to put a token-shaped string into one.

Two places hold it, for two readers:

- the `audit` table of the agent's database, shared by replicas and queried by
  `codestore audit` through POST /v1/audit/query (`search`, below: every replica's
  rows, filtered in SQL on indexed columns): grant changes are written in the same transaction as the change
  itself (a grant never exists without its record: `Change` and `withdraw` below); mints and refusals are buffered
  and added in batches by the store's flush (every second), so the database is not
  written once per token;
- a JSON-lines file (`--audit-log`, default in the state dir), appended at once with
  O_APPEND, for `tail -f` and log shippers, and as the record of mints a SIGKILLed
  replica had not flushed yet. It holds only this replica's records; nothing reads
  it back except `codestore audit` when no agent answers.
"""

from __future__ import annotations

import calendar
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ..audit import EVENTS, TIME_FORMAT, Query
from ..errors import UsageError, redact
from . import db

MAX_BUFFER = 100_000  # rows waiting for the database; beyond it the file alone has them
FLUSH_ROWS = 100  # rows a flush transaction on SQLite (a short hold of its one write lock)
SCAN_CHUNK = 500  # rows read per statement when a filter (ref) is checked here, not in SQL
MAX_SCAN = 200_000  # rows one query may look at; beyond it the reply is truncated, with a cursor

db.register("audit", [
    """
    CREATE TABLE audit (
        id {id},
        time {bigint} NOT NULL,
        event TEXT NOT NULL,
        grant_id TEXT,
        sub TEXT,
        repo TEXT,
        result TEXT,
        replica TEXT NOT NULL,
        fields TEXT NOT NULL
    );
    CREATE INDEX audit_event ON audit (event, id);
    CREATE INDEX audit_grant ON audit (grant_id, id);
    CREATE INDEX audit_repo ON audit (repo, id)
    """,
    # `codestore audit --sub`. No index on time: rows are numbered in about time order, so
    # `--since` reads the newest rows backwards and stops; every index is a cost per mint.
    """
    CREATE INDEX audit_sub ON audit (sub, id)
    """,
])

# Query fields that are columns: compared in SQL, on an index each (see the migrations).
_COLUMNS = {"repo": "repo", "grant": "grant_id", "sub": "sub", "event": "event"}
# A row: its columns and their SQL types, for one insert (a grant change) and for a flush's many.
_TABLE = "audit (time, event, grant_id, sub, repo, result, replica, fields)"
_TYPES = ("bigint", "text", "text", "text", "text", "text", "text", "text")
_INSERT = f"INSERT INTO {_TABLE} VALUES ({', '.join('?' * len(_TYPES))})"
_INSERT_ROWS = f"INSERT INTO {_TABLE} SELECT * FROM {{rows}}"


_LINE = json.JSONEncoder(separators=(",", ":"), default=str).encode  # one encoder, not one per entry
_last_stamp = (-1, "")  # (second, its text): replaced whole, so threads never see half of it


def _stamp(second: int) -> str:
    """An entry's UTC time to the second: formatted once a second, not once a token."""
    global _last_stamp
    last = _last_stamp
    if last[0] != second:
        last = _last_stamp = (second, time.strftime(TIME_FORMAT, time.gmtime(second)))
    return last[1]


_TIME_MARK = "\x00time"  # a stand-in for the time's text in Entry; any other value with it is after the time's


_MARK_TEXT = _LINE(_TIME_MARK)[1:-1]  # as it is written in a line (escaped)


class Entry:
    """An audit entry but its time: the line around the time's text, the row's columns."""

    __slots__ = ("head", "tail", "columns")

    def __init__(self, head: str, tail: str, columns: tuple[object, ...]) -> None:
        self.head, self.tail, self.columns = head, tail, columns

    def at(self, now: float) -> tuple[str, tuple[object, ...]]:
        """(the file's line, the database's row) at `now`."""
        second = int(now)
        text = self.head + _stamp(second) + self.tail
        return text, (second, *self.columns, text)


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            # O_APPEND: each line lands whole even if another process appends too.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except IsADirectoryError:
            raise UsageError(f"--audit-log {path} is a directory; name a file in it, e.g. {os.path.join(path, 'audit.log')}") from None
        except OSError as e:
            raise UsageError(f"cannot open the audit log {path} ({e.strerror}); pass --audit-log FILE") from None
        self._lock = threading.Lock()
        self._buffer: list[tuple[object, ...]] = []
        self._owed = 0  # rows the flush in progress has still to write (flush_into)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.dropped = 0

    def _entry(self, event: str, fields: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
        return self.prepare(event, fields).at(time.time())

    def prepare(self, event: str, fields: Mapping[str, object]) -> Entry:
        """An entry but its time, encoded once (for one that recurs: a grant's mint of one request)."""
        entry: dict[str, object] = {"time": _TIME_MARK, "event": event}
        entry.update(fields)
        if isinstance(entry.get("reason"), str):
            entry["reason"] = redact(str(entry["reason"]))
        head, _, tail = _LINE(entry).partition(_MARK_TEXT)  # "time" comes first, so its value is the first mark
        row = (event, entry.get("grant"), entry.get("sub"), entry.get("repo"), entry.get("result"), self.replica)
        return Entry(head, tail, tuple(None if v is not None and not isinstance(v, (str, int)) else v for v in row))

    def _append(self, text: str) -> None:
        os.write(self._fd, (text + "\n").encode("utf-8"))

    def record(self, event: str, fields: Mapping[str, object]) -> None:
        """A mint or refusal: to the file now (OSError if it cannot be), to the database soon."""
        self.emit(self.prepare(event, fields))

    def emit(self, entry: Entry) -> None:
        """`record` of a prepared entry, at this second."""
        text, row = entry.at(time.time())
        with self._lock:
            if len(self._buffer) < MAX_BUFFER:
                self._buffer.append(row)
            else:
                self.dropped += 1
            self._append(text)

    def in_transaction(self, event: str, fields: Mapping[str, object]) -> tuple[Callable[[db.Tx], None], Callable[[], str | None]]:
        """For a grant change: (write the row inside its transaction, then append the file line).

        The second returns None, or what went wrong with the file: the change and its row
        are committed by then, so the caller reports success and this as a warning.
        """
        text, row = self._entry(event, fields)

        def write(tx: db.Tx) -> None:
            tx.execute(_INSERT, row)

        def after() -> str | None:
            with self._lock:
                try:
                    self._append(text)
                except OSError as e:
                    return f"the audit log file {self.path} could not be written ({e.strerror}); the database has the record"
            return None

        return write, after

    def flush_into(self, tx: db.Tx) -> Callable[[], bool]:
        """Insert buffered rows in `tx` (on SQLite up to FLUSH_ROWS); the returned callback
        forgets them once committed and says whether this flush has more (GrantStore.flush).

        A flush writes the rows buffered when it began; later ones wait for the next. Taking
        them as they came, a flush under load never ended: a transaction every FLUSH_PAUSE
        with the few rows of those 5 ms, each writing the same table and index pages again
        (seven page writes a row where a second's rows in a few transactions take one).
        """
        with self._lock:
            if not self._owed:
                self._owed = len(self._buffer)
            batch = self._buffer[:min(self._owed, FLUSH_ROWS)] if tx.one_writer else list(self._buffer)
        if batch:
            tx.execute_rows(_INSERT_ROWS, _TYPES, batch)

        def committed() -> bool:
            with self._lock:
                del self._buffer[: len(batch)]
                self._owed = max(0, self._owed - len(batch))
                return self._owed > 0

        return committed

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


class _Public(Protocol):
    def public(self) -> dict[str, object]: ...


T = TypeVar("T", bound=_Public)


class Change(Generic[T]):
    """The audit row of one admin change (a grant, a trust policy), committed with the change.

    Handed to the store as its `audit` hook, it writes the row inside the change's own
    transaction: a change never exists without its record. `after()`, once committed,
    appends the file line and returns what went wrong with it (None: nothing), for `told`.
    """

    def __init__(self, log: AuditLog, event: str, fields: Callable[[T], Mapping[str, object]]) -> None:
        self._log, self._event, self._fields = log, event, fields
        self._after: Callable[[], str | None] = lambda: None

    def __call__(self, tx: db.Tx, thing: T) -> None:
        write, self._after = self._log.in_transaction(self._event, self._fields(thing))
        write(tx)

    def after(self) -> str | None:
        return self._after()


def told(reply: dict[str, object], done: str, *warnings: str | None) -> dict[str, object]:
    """An admin reply once the change is committed: with what failed after the commit, if anything."""
    failed = [w for w in warnings if w]
    if failed:
        reply["warning"] = f"{done}, but " + "; ".join(failed)
    return reply


def withdraw(log: AuditLog, event: str, fields: Callable[[T], Mapping[str, object]],
             remove: Callable[[Change[T]], T | None], *, name: str, listing: str, verb: str, done: str,
             then: Callable[[T], str | None] = lambda thing: None) -> tuple[int, dict[str, object]]:
    """An admin call that ends something (a grant's revocation, a trust policy's removal), with its audit row.

    `remove(audit)` makes the change in one transaction, calling `audit` in it, and returns
    what it ended (None: there is no `name`). The reply: 503 when the store could not
    commit (nothing changed: try again), 404 when there is nothing to end, else 200 with
    its public fields and a warning for what failed after the commit: the audit file, then
    `then` (what else the change undoes, e.g. a grant's socket).
    """
    audit = Change(log, event, fields)
    try:
        thing = remove(audit)
    except db.StoreError as e:
        return 503, {"error": f"{name} {'may not be' if e.maybe_committed else 'was NOT'} {verb}: {e}; try again"}
    if thing is None:
        return 404, {"error": f"no {name}; see: codestore {listing} list"}
    return 200, told(thing.public(), f"{name} {done}", audit.after(), then(thing))


def _where(query: Query) -> tuple[list[str], list[object]]:
    """The SQL part of a query: equality on columns, the time range as epoch seconds."""
    c = query.criteria
    where: list[str] = []
    params: list[object] = []
    for key, column in _COLUMNS.items():
        if key in c:
            where.append(f"{column} = ?")
            params.append(c[key])
    if "ref" in c and "event" not in c:
        where.append(f"event IN ({', '.join('?' for _ in EVENTS)})")  # only they touch refs
        params.extend(EVENTS)
    # Entries' text times are the row's epoch second, formatted: the same comparison.
    if "since" in c:
        where.append("time >= ?")
        params.append(calendar.timegm(time.strptime(c["since"], TIME_FORMAT)))
    if "until" in c:
        where.append("time <= ?")
        params.append(calendar.timegm(time.strptime(c["until"], TIME_FORMAT)))
    return where, params


def statement(query: Query, before: int | None, limit: int) -> tuple[str, list[object]]:
    """The SELECT for one page: the newest `limit` rows older than `before` that SQL can pick."""
    where, params = _where(query)
    if before is not None:
        where.append("id < ?")
        params.append(before)
    sql = "SELECT id, fields FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
    return sql, [*params, limit]


def search(database: db.Database, query: Query, limit: int, before: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Entries of the `audit` table matching `query`, newest last, at most `limit`.

    Every replica's rows, the newest as the database took them. The second value is
    None when nothing older matches, else the cursor (`before`) for the page of older
    entries. Columns are filtered in SQL; each row is checked again against the whole
    query (the `ref` filter only here), so the answer is exactly what `Query.matches`
    keeps from a file. A StoreError when the database cannot answer.
    """
    chunk = SCAN_CHUNK if "ref" in query.criteria else limit + 1
    found: list[tuple[int, dict[str, Any]]] = []
    cursor, scanned = before, 0
    while True:
        with database.transaction(write=False) as tx:
            rows = tx.execute(*statement(query, cursor, chunk))
        for rid, text in rows:
            scanned += 1
            cursor = int(rid)  # type: ignore[call-overload]
            try:
                entry = json.loads(str(text))
            except ValueError:
                continue
            if isinstance(entry, dict) and query.matches(entry):
                found.append((cursor, entry))
                if len(found) > limit:
                    break
        if len(found) > limit:
            found = found[:limit]
            more: int | None = found[-1][0]
            break
        if len(rows) < chunk:
            more = None
            break
        if scanned >= MAX_SCAN:
            more = cursor
            break
    # Paged in the database's order; shown in time order (a push is committed at once,
    # the mint that bought its token may be added by a flush a second later).
    entries = sorted((entry for _, entry in reversed(found)), key=lambda e: str(e.get("time", "")))
    return entries, more
