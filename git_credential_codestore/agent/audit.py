"""The audit trail: one record per mint, refusal and grant change.

Records carry who (grant id, `sub`, peer), what (repo, namespace, scopes, TTL) and the
result or the reason for a refusal: never a token or a grant secret. The agent builds
entries from request fields it has already validated, and passes reasons through
`errors.redact` in case a caller managed to put a token-shaped string into one.

Two places hold it, for two readers:

- the `audit` table of the agent's database, shared by replicas and queried by
  `codestore audit` through POST /v1/audit/query (`search`, below: every replica's
  rows, filtered in SQL on the event's index and on spans of grant, `sub` and repo): grant changes are written in the same transaction as the change
  itself (a grant never exists without its record: `Change` and `withdraw` below); mints and refusals are buffered
  and added in batches by the store's flush (every second), so the database is not
  written once per token;
- a JSON-lines file (`--audit-log`, default in the state dir), appended at once with
  O_APPEND, for `tail -f` and log shippers, and as the record of mints a SIGKILLed
  replica had not flushed yet. It holds only this replica's records (each line names the
  process that wrote it, `replica`); `codestore audit` reads it when no agent answers,
  and `recover` reads its tail back into the database after a writer was killed.
"""

from __future__ import annotations

import calendar
import collections
import contextlib
import errno
import fcntl
import heapq
import itertools
import json
import operator
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Generic, Protocol, TypeVar

from .. import jsontext
from ..audit import EVENTS, TIME_FORMAT, Query
from ..errors import UsageError, redact
from ..files import open_append, open_nonblocking
from ..lines import has_surrogate
from . import db

MAX_BUFFER = 100_000  # rows waiting for the database; beyond it the file alone has them
MAX_AREAS = 100_000  # areas a writer remembers having listed (`flush_into`); beyond it it starts again
FLUSH_ROWS = 100  # rows a flush transaction on SQLite (a short hold of its one write lock)
SCAN_CHUNK = 500  # rows read per statement when a filter (ref) is checked here, not in SQL
MAX_SCAN = 200_000  # rows one query may look at; beyond it the reply is truncated, with a cursor
SPAN_SCAN = 4000  # rows of spans a page reads when SQL filters the rows too (`_page`)
RECOVER_BYTES = 16 << 20  # the end of the audit file `recover` reads back
RECOVER_WINDOW = 60  # seconds: the last run's writers wrote within it of the file's end; a writer without progress is read back over it
RECOVER_SLACK = 60  # seconds a row may have waited for its flush: how far past that `recover` looks back
RECOVER_MAX = 3600  # seconds before a killed writer's last line that `recover` goes back at most (its progress)
PROGRESS_AHEAD = 10  # seconds a writer's progress may be past its last line (it flushed after it); more is a namesake's
# A row numbered more than LATE seconds after its time (a flush of what waited while the
# store was away; records `recover` adds back) is `late`: flagged with the second it was
# numbered, found by writer and time on an index of its own, and left out of the bisection
# by which `recover` finds the others (see _stored). Less than RECOVER_SLACK.
LATE = 30

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
    # Spans, not an index entry a row on grant, `sub` and repository (see `insert`). Rows
    # written without spans (before the upgrade, or by a replica not yet upgraded) are
    # `spanned` NULL, in partial indexes that rows with spans never enter.
    """
    ALTER TABLE audit ADD COLUMN spanned {bigint};
    CREATE TABLE audit_spans (
        first_id {bigint} NOT NULL,
        last_id {bigint} NOT NULL,
        grant_id TEXT,
        sub TEXT,
        repo TEXT
    );
    CREATE INDEX audit_spans_grant ON audit_spans (grant_id, first_id);
    CREATE INDEX audit_spans_sub ON audit_spans (sub, first_id);
    CREATE INDEX audit_spans_repo ON audit_spans (repo, first_id);
    CREATE INDEX audit_unspanned_grant ON audit (grant_id, id) WHERE spanned IS NULL;
    CREATE INDEX audit_unspanned_sub ON audit (sub, id) WHERE spanned IS NULL;
    CREATE INDEX audit_unspanned_repo ON audit (repo, id) WHERE spanned IS NULL;
    DROP INDEX audit_grant;
    DROP INDEX audit_sub;
    DROP INDEX audit_repo
    """,
    # Spans indexed by their bucket first (see `insert`), each grant, `sub` and repository's
    # areas listed for queries. Spans written without a bucket (before this upgrade, or by a
    # replica not yet upgraded) stay on partial indexes of their own, as rows without spans do.
    """
    ALTER TABLE audit_spans ADD COLUMN bucket {bigint};
    CREATE TABLE audit_span_areas (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        area {bigint} NOT NULL,
        PRIMARY KEY (kind, value, area)
    );
    CREATE INDEX audit_spans_at_grant ON audit_spans (bucket, grant_id, first_id) WHERE bucket IS NOT NULL;
    CREATE INDEX audit_spans_at_sub ON audit_spans (bucket, sub, first_id) WHERE bucket IS NOT NULL;
    CREATE INDEX audit_spans_at_repo ON audit_spans (bucket, repo, first_id) WHERE bucket IS NOT NULL;
    CREATE INDEX audit_unbucketed_grant ON audit_spans (grant_id, first_id) WHERE bucket IS NULL;
    CREATE INDEX audit_unbucketed_sub ON audit_spans (sub, first_id) WHERE bucket IS NULL;
    CREATE INDEX audit_unbucketed_repo ON audit_spans (repo, first_id) WHERE bucket IS NULL;
    DROP INDEX audit_spans_grant;
    DROP INDEX audit_spans_sub;
    DROP INDEX audit_spans_repo
    """,
    # Late rows (LATE): flagged, and indexed by writer and time, apart from the others.
    """
    ALTER TABLE audit ADD COLUMN late {bigint};
    CREATE INDEX audit_late ON audit (replica, time) WHERE late IS NOT NULL
    """,
    # Each writer's progress, for `recover` (see _progress).
    """
    CREATE TABLE audit_progress (
        replica TEXT PRIMARY KEY,
        stored {bigint} NOT NULL,
        taking {bigint} NOT NULL
    )
    """,
])
# A writer's progress (_progress): `taking` only ever moves forward.
_LATER = "taking = CASE WHEN excluded.taking > audit_progress.taking THEN excluded.taking ELSE audit_progress.taking END"
_PROGRESS = ("INSERT INTO audit_progress (replica, stored, taking) VALUES (?, ?, ?) "
             f"ON CONFLICT (replica) DO UPDATE SET stored = excluded.stored, {_LATER}")
_TAKING = f"INSERT INTO audit_progress (replica, stored, taking) VALUES (?, 0, ?) ON CONFLICT (replica) DO UPDATE SET {_LATER}"

# Query fields that are columns: compared in SQL; event on its index, the others on spans'.
_COLUMNS = {"repo": "repo", "grant": "grant_id", "sub": "sub", "event": "event"}
_SPANNED = {"repo": "repo", "grant": "grant_id", "sub": "sub"}
_KIND_VALUES = ", ".join(f"('{kind}', r.{column})" for kind, column in _SPANNED.items())  # an audit row `r`'s areas' (kind, value)
# A row: its columns but its id, and their SQL types, as entries make them (`Entry.at`).
_TABLE = "audit (time, event, grant_id, sub, repo, result, replica, fields)"
_TYPES = ("bigint", "text", "text", "text", "text", "text", "text", "text")
_NUMBERED = "audit (id, spanned, time, event, grant_id, sub, repo, result, replica, fields)"
_NUMBERED_LATE = "audit (id, spanned, time, event, grant_id, sub, repo, result, replica, fields, late)"
_SPANNED_ROW = "audit (spanned, time, event, grant_id, sub, repo, result, replica, fields)"  # numbered by the table
_SPANS = "audit_spans (first_id, last_id, grant_id, sub, repo, bucket)"
_SPAN_TYPES = ("bigint", "bigint", "text", "text", "text", "bigint")
SPAN_ROWS = 100  # rows a span covers at most: what a query reads past the page it wants
# A span's bucket is its first id >> BUCKET_BITS (65536 ids, about 5 s of rows at 13k
# tokens/s), the first column of the spans' indexes; an area is AREA_BITS' worth of ids (64
# buckets, about 5 minutes), listed in `audit_span_areas` for each grant, `sub` and repository
# that has spans in it (`insert`, `_bucketed_spans`).
BUCKET_BITS = 16
AREA_BITS = 22
_KINDS = ("grant", "sub", "repo")  # `audit_span_areas.kind`: a span's columns 2, 3, 4
Area = tuple[str, str, int]  # a row of `audit_span_areas`: (kind, value, area)
_AREAS = "INSERT INTO audit_span_areas (kind, value, area) SELECT * FROM {rows} WHERE true ON CONFLICT DO NOTHING"
ID_ROWS = 8 * db.PG_COPY_ROWS  # rows numbered by one statement (`insert`)


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
    """An audit entry but its time: the line around the time's text, the row's columns, and
    its group: (grant, sub, repo), the columns queries find through spans (see flush_into, insert)."""

    __slots__ = ("head", "tail", "columns", "group")

    def __init__(self, head: str, tail: str, columns: tuple[object, ...]) -> None:
        self.head, self.tail, self.columns = head, tail, columns
        self.group = columns[1:4]

    def at(self, now: float) -> tuple[str, tuple[object, ...]]:
        """(the file's line, the database's row) at `now`."""
        second = int(now)
        text = self.head + _stamp(second) + self.tail
        return text, (second, *self.columns, text)


def _redacted(value: object) -> object:
    """`value` with errors.redact applied to every text in it, at any depth."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            self._fd = open_append(path)  # O_APPEND: each line lands whole even if another process appends too
        except IsADirectoryError:
            raise UsageError(f"--audit-log {path} is a directory; name a file in it, e.g. {os.path.join(path, 'audit.log')}") from None
        except OSError as e:
            raise UsageError(f"cannot open the audit log {path} ({e.strerror}); pass --audit-log FILE") from None
        # A shared lock for as long as this writer lives: `recover` reads the file's records
        # into the database only when nobody holds one (or for a writer it knows is dead).
        with contextlib.suppress(OSError):  # held exclusively by someone else, or no locks here: never wait for it
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self._lock = threading.Lock()
        self._torn = False  # the last line written only in part (_append)
        # Rows waiting for a flush to begin, by their entry's group, each group's in the order they came.
        self._buffer: dict[tuple[object, ...], list[tuple[object, ...]]] = {}
        self._taken: list[tuple[object, ...]] = []  # rows the flush in progress has still to write (flush_into)
        self._taken_at = 0  # the second they were taken in
        self._advanced = 0  # the `taking` of this writer's progress its last commit said (flush_into)
        self._held = 0  # rows in both
        # Areas (kind, value, area) this writer's committed flushes have listed: not listed again.
        self._areas: frozenset[Area] = frozenset()
        self.replica = replica_of(os.getpid())
        self.dropped = 0

    def _entry(self, event: str, fields: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
        return self.prepare(event, fields).at(time.time())

    def prepare(self, event: str, fields: Mapping[str, object]) -> Entry:
        """An entry but its time, encoded once (for one that recurs: a grant's mint of one request)."""
        entry: dict[str, object] = {"time": _TIME_MARK, "event": event}
        entry.update(fields)
        entry["replica"] = self.replica
        line = _LINE(entry)
        if redact(line) != line:
            # Any value a caller chose (a repository, a ref rule, a reason quoting either) may
            # carry a grant's secret or a token: written redacted, in the line and the columns.
            entry = _redacted(entry)  # type: ignore[assignment]
            line = _LINE(entry)
        head, _, tail = line.partition(_MARK_TEXT)  # "time" comes first, so its value is the first mark
        return Entry(head, tail, _columns(entry))

    def _append(self, text: str) -> None:
        """One line to the file, whole, or OSError. A write the disk takes only part of (full,
        or the file at its size limit) is an error too: the token it records is not handed
        out. The part stays; this process's next line begins on a line of its own, so the
        cut line is one `recover` skips, not one that swallows the next record."""
        data = (text + "\n").encode("utf-8")
        if self._torn:
            data = b"\n" + data
        written = os.write(self._fd, data)
        self._torn = written < len(data)
        if self._torn:
            raise OSError(errno.ENOSPC, f"only {written} of a line's {len(data)} bytes were written: the disk is full, "
                                        "or the file at its size limit")

    def record(self, event: str, fields: Mapping[str, object]) -> None:
        """A mint or refusal: to the file now (OSError if it cannot be), to the database soon.
        A refusal stands whatever the file says, so its row is kept when its line is not."""
        self.emit(self.prepare(event, fields), stands=event == "refuse")

    def emit(self, entry: Entry, stands: bool = False) -> None:
        """`record` of a prepared entry, at this second. The line first: an entry whose line
        the file did not take is no row either (a mint is then refused, so it must not reach
        the table as minted; a push report is then answered with the error), unless it
        `stands` (a refusal, refused all the same). Its time is read under the lock that a
        flush takes its rows under, so a record held after a flush began is never older than
        the flush (flush_into's progress)."""
        with self._lock:
            text, row = entry.at(time.time())
            try:
                self._append(text)
            except OSError:
                if stands:
                    self._hold(entry.group, row)
                raise
            self._hold(entry.group, row)

    def _hold(self, group: tuple[object, ...], row: tuple[object, ...]) -> None:
        """A row into the buffer, for the next flush (under the lock)."""
        if self._held < MAX_BUFFER:
            rows = self._buffer.get(group)
            if rows is None:
                self._buffer[group] = [row]
            else:
                rows.append(row)
            self._held += 1
        else:
            self.dropped += 1

    def in_transaction(self, event: str, fields: Mapping[str, object]) -> tuple[Callable[[db.Tx], None], Callable[[], str | None]]:
        """For a grant change: (write the row inside its transaction, then append the file line).

        The second returns None, or what went wrong with the file: the change and its row
        are committed by then, so the caller reports success and this as a warning.
        """
        text, row = self._entry(event, fields)

        def write(tx: db.Tx) -> None:
            insert(tx, [row], taking={self.replica: int(row[0])})  # type: ignore[call-overload]

        def after() -> str | None:
            with self._lock:
                try:
                    self._append(text)
                except OSError as e:
                    return f"the audit log file {self.path} could not be written ({e.strerror}); the database has the record"
            return None

        return write, after

    def flush_into(self, tx: db.Tx) -> Callable[[], int]:
        """Insert buffered rows in `tx` (on SQLite up to FLUSH_ROWS); the returned callback
        forgets them once committed and says how many more transactions this flush needs
        (GrantStore.flush, which runs one flush at a time).

        A flush writes the rows buffered when it began; later ones wait for the next. Taking
        them as they came, a flush under load never ended: a transaction every FLUSH_PAUSE
        with the few rows of those 5 ms, each writing the same table and index pages again
        (seven page writes a row where a second's rows in a few transactions take one).

        It writes them grouped by (grant, sub, repo), each group's rows in the order they
        came: the indexes on those columns then take a transaction's rows in a few places
        each, not one place a row. With 1000 grants in use, a 100-row transaction of rows as
        they came touched about 100 leaf pages of each index, and the database's work made
        the load 10-20% slower than with 10 grants (two workers: 0.78-0.81 of it, against
        0.90-0.93 grouped). Rows are still numbered within about a flush of their time, as
        `recover` and `_stored` need.

        The rows are grouped as they come (`emit`), and a flush takes the groups in the order
        they first came: what the indexes gain is each group's rows together, not an order
        between groups. Sorting a second's rows instead (13k under load) held the GIL for
        11 ms at once, in C, where no other thread can take it (sorting 7k groups, 5 ms;
        joining the groups' lists, 0.1 ms): every token in flight waited that long.
        """
        with self._lock:
            if not self._taken:  # a new flush: the groups' lists joined (0.1 ms), under the lock
                self._taken = list(itertools.chain.from_iterable(self._buffer.values()))
                self._buffer = {}
                self._taken_at = int(time.time())
            taken = self._taken
        batch = taken[:FLUSH_ROWS] if tx.one_writer else list(taken)
        # This writer's progress, for `recover` (_progress): no row of the flush is of a time
        # after the second it began in, and once its last rows are in, every record held
        # before it began is (emit reads its time under the lock; a second less, for a clock
        # set back). Said once a flush: by its last transaction, or by its first of several
        # (SQLite), not again by each of the others (a statement and a page each).
        ends = len(batch) == len(taken)
        advance = None if ends or self._advanced == self._taken_at else {self.replica: self._taken_at}
        listed = insert(tx, batch, self._areas, advance) if batch else set()
        if batch and ends:
            tx.execute(_PROGRESS, [self.replica, self._taken_at - 1, self._taken_at])

        def committed() -> int:
            with self._lock:
                if batch:
                    self._advanced = self._taken_at
                del self._taken[: len(batch)]
                self._held -= len(batch)
                if listed:  # kept for an area's five minutes or so: about 3 a grant in use
                    self._areas = frozenset(listed) if len(self._areas) > MAX_AREAS else self._areas | listed
                return -(-len(self._taken) // FLUSH_ROWS)

        return committed

    @property
    def buffered(self) -> int:
        return self._held

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def insert(tx: db.Tx, rows: Sequence[tuple[object, ...]], known: AbstractSet[Area] = frozenset(),
           taking: Mapping[str, int] | None = None) -> set[Area]:
    """`rows` (`Entry.at`'s) into the audit table, with their spans; returns the areas it
    listed that are not in `known` (`AuditLog`'s, of flushes already committed).

    A span is a run of consecutive ids whose rows all have one grant, `sub` and repository
    (at most SPAN_ROWS of them); queries by those columns find rows through the spans'
    indexes (`_page`). An index entry a row in each of the three cost the flush a
    leaf page of each index a grant in use: with 1000 grants in use, 1000 places a second
    in each, where a flush's rows of one grant are a few spans (they come grouped,
    `flush_into`). Spans are exact, so a query reads no other group's rows: ids are taken
    before the insert (`Tx.new_ids`), and a run another session numbered into ends a span.

    The spans' indexes begin with the span's bucket (its first id >> BUCKET_BITS), so a
    second's spans land in the few leaf pages of the newest bucket. Indexed by grant first,
    the second's 1000 spans had reached 1000 leaf pages of each index once the indexes had
    spread (about 100k spans), each page written to the WAL, synced and checkpointed: on a
    store that had served for a while (0.5 GB), the agent wrote 3425 bytes a token with
    1000 grants in use against 1674 with 10; 2087 since (docs/fleet.md). A query finds a grant's
    buckets through `audit_span_areas`: a row for each grant, `sub` and repository with
    spans in an area (64 buckets), written once (ON CONFLICT DO NOTHING, in one order so
    that replicas' flushes never wait on each other in a cycle), and not again by this
    writer while `known` has it.

    In chunks: ids for ID_ROWS at a time (PostgreSQL's sequence numbering a second's 14k
    rows in one statement was a burst of its server's CPU beside the agent, and the
    agent's p99 rose), rows a COPY at a time (PG_COPY_ROWS: numbering and spanning 14k
    rows in one Python loop held the GIL for milliseconds at once), and `tx.pace` called
    after each with the COPYs still to come (GrantStore._pace spreads them over the flush
    interval).

    A row more than LATE seconds older than now is flagged `late` (with now), for `recover`
    (_stored): numbered among rows of newer times, it is found by writer and time instead.
    `taking`: for each writer whose rows these are, a second none of them is after: its
    progress's `taking` moves up to it in the same transaction (_progress).
    """
    now = int(time.time())
    late = now - LATE  # a row whose time is before this is late
    advance = list((taking or {}).items())
    if len(rows) == 1 and tx.dialect == "postgresql" and _TIME(rows[0]) >= late and len(advance) <= 1:
        # One row (a grant change, in its own transaction): one round trip, not the six of
        # its writer's progress, numbering, COPY, the span's COPY and its areas, each a
        # network round trip to a fleet's server.
        tx.execute(f"WITH {f'p AS ({_TAKING}), ' if advance else ''}"
                   f"r AS (INSERT INTO {_SPANNED_ROW} VALUES ({', '.join('?' * (len(_TYPES) + 1))}) "
                   "RETURNING id, grant_id, sub, repo), "
                   f"s AS (INSERT INTO {_SPANS} SELECT id, id, grant_id, sub, repo, id >> {BUCKET_BITS} FROM r "
                   "WHERE grant_id IS NOT NULL OR sub IS NOT NULL OR repo IS NOT NULL) "
                   f"INSERT INTO audit_span_areas (kind, value, area) SELECT k.kind, k.value, r.id >> {AREA_BITS} FROM r "
                   f"CROSS JOIN LATERAL (VALUES {_KIND_VALUES}) AS k (kind, value) "
                   "WHERE k.value IS NOT NULL ORDER BY 1, 2 ON CONFLICT DO NOTHING",
                   (*(advance[0] if advance else ()), 1, *rows[0]))
        return set()
    for writer, second in advance:
        tx.execute(_TAKING, [writer, second])
    spans: list[tuple[object, ...]] = []
    ids: list[int] = []
    for at in range(0, len(rows), db.PG_COPY_ROWS):
        if at % ID_ROWS == 0:
            ids = tx.new_ids("audit", len(rows[at:at + ID_ROWS]))
        chunk, numbers = rows[at:at + db.PG_COPY_ROWS], ids[at % ID_ROWS:at % ID_ROWS + db.PG_COPY_ROWS]
        numbered = list(map(operator.add, zip(numbers, _ONES, strict=False), chunk))  # (id, 1, *row), in C
        if min(map(_TIME, chunk)) >= late:
            tx.insert_rows(_NUMBERED, ("bigint", "bigint", *_TYPES), numbered)
        else:  # rare: after the store was away, or from `recover`
            tx.insert_rows(_NUMBERED_LATE, ("bigint", "bigint", *_TYPES, "bigint"),
                           [(*row, now if row[2] < late else None) for row in numbered])
        spans.extend(_spans(numbers, chunk))
        tx.pace(-(-(len(rows) - at) // db.PG_COPY_ROWS))  # this one's rest, and the spans' COPY
    tx.insert_rows(_SPANS, _SPAN_TYPES, spans)
    areas = {(kind, str(value), int(span[0]) >> AREA_BITS)  # type: ignore[call-overload]
             for span in spans for kind, value in zip(_KINDS, span[2:5], strict=False) if value is not None}
    new = areas - known if known else areas
    tx.execute_rows(_AREAS, ("text", "text", "bigint"), sorted(new))
    return new


_GROUP = operator.itemgetter(2, 3, 4)  # a row's grant, sub and repo
_TIME = operator.itemgetter(0)  # a row's time
_ONES = itertools.repeat(1)  # `spanned`


def _spans(ids: list[int], rows: Sequence[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """The spans of rows numbered `ids`: a group's run of consecutive ids, SPAN_ROWS at most
    a span, none for rows with no grant, sub or repo; each (first, last, grant, sub, repo,
    bucket). Consecutive ids (always on SQLite; on PostgreSQL unless another session took
    numbers meanwhile) are counted a group at a time, in C (groupby); others are looked at
    one by one."""
    spans: list[tuple[object, ...]] = []
    if ids and ids[-1] - ids[0] == len(ids) - 1:
        at = ids[0]
        for key, members in itertools.groupby(rows, _GROUP):
            end = at + len(list(members))
            if key != (None, None, None):
                spans.extend((first, min(first + SPAN_ROWS, end) - 1, *key, first >> BUCKET_BITS) for first in range(at, end, SPAN_ROWS))
            at = end
        return spans
    first = last = -2
    group: tuple[object, ...] = ()
    for i, row in zip(ids, rows, strict=True):
        if i != last + 1 or i - first >= SPAN_ROWS or _GROUP(row) != group:
            if group != (None, None, None) and first >= 0:
                spans.append((first, last, *group, first >> BUCKET_BITS))
            first, group = i, _GROUP(row)
        last = i
    if group != (None, None, None) and first >= 0:
        spans.append((first, last, *group, first >> BUCKET_BITS))
    return spans


def replica_of(pid: int) -> str:
    """The name of this machine's process `pid` as a writer of audit records (the `replica` column)."""
    return f"{socket.gethostname()}:{pid}"


def _columns(entry: Mapping[str, object]) -> tuple[object, ...]:
    """A row's columns after `time`, but `fields` (the line), all text that both stores can
    hold: a number as its digits, anything else not a string NULL, and in a string a NUL or
    a lone surrogate as U+FFFD (see _text). Made once a prepared entry, not once a token."""
    row = (entry.get("event"), entry.get("grant"), entry.get("sub"), entry.get("repo"), entry.get("result"), entry.get("replica"))
    return tuple(_text(v) if isinstance(v, str) else str(v) if isinstance(v, int) and not isinstance(v, bool) else None
                 for v in row)


def _text(value: str) -> str:
    """`value` with what a store's text cannot hold replaced by U+FFFD.

    The agent's own entries never have it (their values are checked where they come in),
    but `recover` parses lines back from a file anyone with the owner's rights can write,
    and JSON's escapes make any code point: "\\u0000" is a string PostgreSQL's text
    refuses, "\\ud800" one that cannot be UTF-8 for either store. Read back, such a value
    failed the transaction it was in: on PostgreSQL the whole recovery with it, on SQLite
    with a UnicodeEncodeError nobody expected, and the agent did not start ("internal
    error", exit 3) until someone mended the line.
    """
    if "\x00" in value or has_surrogate(value):
        return "".join("\ufffd" if c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def recover(database: db.Database, path: str, writers: Collection[str] | None = None) -> int:
    """Add to the database the records that killed writers appended to the file at `path`
    but had not flushed (mints and refusals wait up to a second in a writer's buffer, longer
    while the store is away); return how many.

    `writers` names the dead writers (`replica_of`: a worker the parent saw die). None means
    every writer in the file, and then only when no live writer has the file open (its
    shared lock, AuditLog): at start, before this agent's writers open it. A writer's rows
    reach the table a flush at a time (the rows buffered when it began), so what is missing
    is among the last of its lines: its records since its progress (_progress; without one,
    an older codestore's writer, the last RECOVER_WINDOW seconds; at most RECOVER_MAX; in
    the last RECOVER_BYTES of the file) are counted against its rows in the table, and each
    one the table has fewer copies of is added, with its own time and writer; then its
    progress moves to its last line. Counting makes it safe to run again: a record already
    added is not added twice. At start, only writers that wrote within RECOVER_WINDOW of
    the file's last line count: the run that just ended.
    """
    try:
        fd = open_nonblocking(path)
    except FileNotFoundError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0  # a device or a pipe (--audit-log /dev/stderr): nothing to read back
        if writers is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a writer lives: its records are its own to flush
        lines = _tail(fd, RECOVER_BYTES)
    finally:
        os.close(fd)
    found: dict[str, list[tuple[int, str]]] = {}
    seconds: dict[str, int] = {}  # a time's text, parsed once: many lines share a second
    for text in lines:
        # Sliced, not parsed: "time" is every line's first key, "replica" its last.
        _, named, writer = text.rpartition(',"replica":"')
        if not (named and writer.endswith('"}') and text.startswith('{"time":"')):
            continue  # a line cut short by the kill, or one from before lines named their writer
        writer = writer[:-2]
        if writers is not None and writer not in writers:
            continue
        second = seconds.get(text[9:29], -1)
        if second < 0:
            try:
                second = seconds[text[9:29]] = calendar.timegm(time.strptime(text[9:29], TIME_FORMAT))
            except ValueError:
                continue
        found.setdefault(writer, []).append((second, text))
    if not found:
        return 0
    last = {w: max(t for t, _ in recs) for w, recs in found.items()}
    newest = max(last.values())
    if writers is None:
        # The last run's writers: an earlier run's were recovered when the run after it
        # started. So the table is read around the file's end only, not back to the oldest
        # writer in 16 MiB of a quiet replica's file (weeks of a fleet's rows).
        found = {w: recs for w, recs in found.items() if last[w] >= newest - RECOVER_WINDOW}
    # From where each writer's records may be missing: its progress (_progress), or, for a
    # writer that kept none (an older codestore), the last RECOVER_WINDOW seconds; from its
    # first line since then, so a writer idle for a day does not send _stored back a day.
    # Up to where they may be in the table but late: the second its last flush began.
    progress = _progress(database, found)
    since: dict[str, int] = {}
    until: dict[str, int] = {}
    for writer, recs in found.items():
        stored, taking = progress.get(writer, (last[writer] - RECOVER_WINDOW, last[writer]))
        if taking > last[writer] + PROGRESS_AHEAD:
            # Not this writer's: a namesake's that lives on (containers given one host name,
            # each the pid 1 of its own), whose flushes keep moving it. As without one.
            stored, taking = last[writer] - RECOVER_WINDOW, last[writer]
        after = [second for second, _ in recs if second >= max(stored, last[writer] - RECOVER_MAX)]
        if after:
            since[writer], until[writer] = min(after), min(last[writer], taking + 1)
    found = {w: recs for w, recs in found.items() if w in since}
    if not found:
        return 0
    have = _stored(database, since, max(until.values()), max(last[w] for w in found))
    missing: list[tuple[object, ...]] = []
    for writer, recs in found.items():
        for second, text in recs:
            key = (writer, second, text)
            if second < since[writer]:
                continue
            if have[key]:
                have[key] -= 1
                continue
            try:
                entry = jsontext.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict):
                missing.append((second, *_columns(entry), text))
    per = FLUSH_ROWS if database.one_writer else max(1, len(missing))
    through = {writer: last[writer] for writer in found}
    for i in range(0, len(missing), per):
        with database.transaction() as tx:
            insert(tx, missing[i:i + per], taking=through if i == 0 else None)  # with the first rows: they may be in from now on
    with database.transaction() as tx:  # each writer's records are all in the table now
        for writer in found:
            # Its last second is read again next time (counted, never added twice): a process
            # started in that second may bear its name (a container's pid 1).
            tx.execute(_PROGRESS, [writer, last[writer], last[writer]])
    return len(missing)


def _progress(database: db.Database, writers: Collection[str]) -> dict[str, tuple[int, int]]:
    """Each writer's progress, as `insert` (with every row of a writer: a flush's, a grant
    change's, those `recover` adds), AuditLog.flush_into and `recover` keep it: (stored,
    taking). No row of the writer in the table is of a time after `taking`. Every record
    of the writer whose time is before `stored` is in the table (but those dropped past
    MAX_BUFFER): the second before its last flush that ended began (a record is never older
    than a flush that began before it was held: emit). So `recover` counts a killed
    writer's lines from `stored` to `taking` against the table, and adds those after it."""
    marks = ", ".join("?" for _ in writers)
    with database.transaction(write=False) as tx:
        rows = tx.execute(f"SELECT replica, stored, taking FROM audit_progress WHERE replica IN ({marks})", list(writers))
    return {str(writer): (int(stored), int(taking)) for writer, stored, taking in rows}  # type: ignore[call-overload]


def _tail(fd: int, size: int) -> list[str]:
    """The whole lines in the last `size` bytes of the file `fd`."""
    end = os.fstat(fd).st_size
    start = max(0, end - size)
    lines = os.pread(fd, end - start, start).decode("utf-8", "replace").split("\n")
    return lines[1:] if start else lines  # the first began before `start`


def _stored(database: db.Database, since: Mapping[str, int], until: int, last: int) -> collections.Counter[tuple[object, object, object]]:
    """(writer, time, line) of the table's rows by the writers in `since`, from their times on, counted.

    Rows are numbered in about the order of their times: a row waits for its flush, up to
    RECOVER_SLACK, unless it is late (LATE: numbered long after its time). So the other
    rows' ids from about `since` to `until` (the writers have no rows of a later time but
    late ones: _progress) are found by bisection on the primary key, late rows left out of
    it, and only the writers' rows among them are read, whatever other replicas wrote
    before and after; the writers' late rows, of any time up to `last`, on their own index.
    A late row among the others (rows flushed after the store was away, old times under new
    ids, or rows of a killed writer added back by the last start) had sent the bisection
    past rows it was looking for, and the records they stood for were added again.
    """
    have: collections.Counter[tuple[object, object, object]] = collections.Counter()
    marks = ", ".join("?" for _ in since)
    with database.transaction(write=False) as tx:
        lowest, highest = tx.execute("SELECT min(id), max(id) FROM audit")[0]
        late = tx.execute(f"SELECT time, replica, fields FROM audit WHERE late IS NOT NULL AND replica IN ({marks}) "
                          "AND time >= ? AND time <= ?", [*since, min(since.values()), last])
    for second, writer, text in late:
        if second >= since[writer]:  # type: ignore[index,operator]
            have[(writer, second, text)] += 1
    if lowest is None:
        return have
    lo = _first_id_at(database, min(since.values()) - RECOVER_SLACK, int(lowest), int(highest))  # type: ignore[call-overload]
    hi = _first_id_at(database, until + RECOVER_SLACK + 1, lo, int(highest))  # type: ignore[call-overload]
    while lo < hi:
        with database.transaction(write=False) as tx:
            rows = tx.execute(f"SELECT id, time, replica, fields FROM audit WHERE id >= ? AND id < ? AND replica IN ({marks}) "
                              "AND late IS NULL ORDER BY id LIMIT ?", [lo, hi, *since, SCAN_CHUNK])
        for rid, second, writer, text in rows:
            lo = int(rid) + 1  # type: ignore[call-overload]
            if second >= since[writer]:  # type: ignore[index,operator]
                have[(writer, second, text)] += 1
        if len(rows) < SCAN_CHUNK:
            break
    return have


def _first_id_at(database: db.Database, second: int, lo: int, highest: int) -> int:
    """About the first id (from `lo`) of a row that is not late whose time is `second` or
    later; highest + 1 if none."""
    hi = highest + 1
    while lo < hi:
        mid = (lo + hi) // 2
        with database.transaction(write=False) as tx:
            found = tx.execute("SELECT id, time FROM audit WHERE id >= ? AND late IS NULL ORDER BY id LIMIT 1", [mid])
        if not found or int(found[0][1]) >= second:  # type: ignore[call-overload]
            hi = mid
        else:
            lo = int(found[0][0]) + 1  # type: ignore[call-overload]
    return lo


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


def _where(query: Query, columns: Mapping[str, str] = _COLUMNS) -> tuple[list[str], list[object]]:
    """The SQL part of a query: equality on `columns`, the time range as epoch seconds."""
    c = query.criteria
    where: list[str] = []
    params: list[object] = []
    for key, column in columns.items():
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


def statement(query: Query, before: int | None, limit: int, unspanned: bool = False) -> tuple[str, list[object]]:
    """The SELECT for one page: the newest `limit` rows older than `before` that SQL can pick.
    For a query on grant, `sub` or repository, only the rows written without spans
    (`unspanned`, on their partial indexes): `spans_statement` and `rows_statement` find the others."""
    where, params = _where(query)
    if unspanned:
        where.append("spanned IS NULL")
    if before is not None:
        where.append("id < ?")
        params.append(before)
    sql = "SELECT id, fields FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
    return sql, [*params, limit]


def _spanned(query: Query) -> tuple[list[str], list[object]]:
    """The spans' part of a query: equality on grant, `sub` and repository."""
    return ([f"{column} = ?" for key, column in _SPANNED.items() if key in query.criteria],
            [query.criteria[key] for key in _SPANNED if key in query.criteria])


def spans_statement(query: Query, before: int | None, limit: int, buckets: Sequence[int] | None = None) -> tuple[str, list[object]]:
    """For a query on grant, `sub` or repository: the SELECT of the newest `limit` spans that
    begin before `before`: those in `buckets`, on the spans' indexes, or with None those
    without a bucket (`insert`), on theirs. Spans do not overlap, so spans newest first hold
    rows newest first."""
    where, params = _spanned(query)
    if buckets is None:
        where.append("bucket IS NULL")
    else:  # numbers made here; the second condition for the planner: the indexes' own
        where[:0] = [f"bucket IN ({', '.join(map(str, buckets))})", "bucket IS NOT NULL"]
    if before is not None:
        where.append("first_id < ?")
        params.append(before)
    return f"SELECT first_id, last_id FROM audit_spans WHERE {' AND '.join(where)} ORDER BY first_id DESC LIMIT ?", [*params, limit]


def areas_statement(query: Query, before: int | None, limit: int) -> tuple[str, list[object]]:
    """For a query on grant, `sub` or repository: the SELECT of the newest `limit` areas
    with spans of the first of them it names, below `before`'s."""
    kind = next(key for key in _KINDS if key in query.criteria)
    where = ["kind = ?", "value = ?"]
    params: list[object] = [kind, query.criteria[kind]]
    if before is not None:
        where.append("area <= ?")
        params.append((before - 1) >> AREA_BITS)
    return f"SELECT area FROM audit_span_areas WHERE {' AND '.join(where)} ORDER BY area DESC LIMIT ?", [*params, limit]


def rows_statement(query: Query, before: int | None, spans: Sequence[tuple[int, int]], limit: int,
                   dialect: str = "sqlite") -> tuple[str, list[object]]:
    """The SELECT of the newest `limit` rows older than `before` that SQL can pick in `spans`
    ((first, last) ids): their rows by id, since a span holds only rows of its grant, `sub`
    and repository.

    PostgreSQL: the spans as two arrays, each one's rows looked up by id in a LATERAL
    subquery, as SQLite's planner does by itself; OFFSET 0 keeps it from flattening the
    subquery into a join, for which its planner walked the whole table back by id (0.9 s a
    page of 300k rows). SQLite: the spans as a VALUES list (SQLITE_PARAMETERS bounds how
    many one statement takes)."""
    where, params = _where(query, {"event": "event"})
    if before is not None:
        where.append("id < ?")
        params.append(before)
    if dialect == "postgresql":
        return ("SELECT a.id, a.fields FROM unnest(CAST(? AS bigint[]), CAST(? AS bigint[])) AS s (first_id, last_id) "
                "CROSS JOIN LATERAL (SELECT id, fields FROM audit "
                f"WHERE id >= s.first_id AND id <= s.last_id{''.join(f' AND {w}' for w in where)} OFFSET 0) a "
                "ORDER BY a.id DESC LIMIT ?", [[f for f, _ in spans], [last for _, last in spans], *params, limit])
    values = ", ".join(["(?, ?)"] * len(spans))
    return (f"WITH s (first_id, last_id) AS (VALUES {values}) SELECT a.id, a.fields FROM s JOIN audit a "
            f"ON a.id >= s.first_id AND a.id <= s.last_id{''.join(f' AND a.{w}' for w in where)} ORDER BY a.id DESC LIMIT ?",
            [*(n for span in spans for n in span), *params, limit])


_AREAS_AT_ONCE = 16  # areas read a statement (`_buckets`)


def _buckets(tx: db.Tx, query: Query, before: int | None) -> Iterator[int]:
    """The buckets of the areas the query's value has spans in, newest first, from `before`'s down."""
    per = AREA_BITS - BUCKET_BITS
    top = before
    while True:
        areas = [int(a) for a, in tx.execute(*areas_statement(query, top, _AREAS_AT_ONCE))]  # type: ignore[call-overload]
        for area in areas:
            highest = ((area + 1) << per) - 1
            yield from range(highest if before is None else min(highest, (before - 1) >> BUCKET_BITS), (area << per) - 1, -1)
        if len(areas) < _AREAS_AT_ONCE:
            return
        top = areas[-1] << AREA_BITS


def _bucketed_spans(tx: db.Tx, query: Query, before: int | None, chunk: int) -> tuple[list[tuple[int, int]], int | None]:
    """The newest spans with a bucket that begin before `before`, newest first, until they
    hold `chunk` rows or are `chunk` spans, and the floor at or above which they are all
    there are (None: all there are).

    Buckets a statement: 1, then twice as many each time, up to an area's. A statement on
    several buckets sorts all their spans of the value; on one it reads the index in order
    and stops at its limit. So a repository 1000 grants use (1000 spans a second) is paged
    from its newest bucket without sorting the area's 300k spans, and a grant used once a
    week costs a few statements an area it was used in."""
    found: list[tuple[int, int]] = []
    held, size = 0, 1
    buckets = _buckets(tx, query, before)
    while group := list(itertools.islice(buckets, size)):
        for first, last in tx.execute(*spans_statement(query, before, chunk - len(found), group)):
            found.append((int(first), int(last)))  # type: ignore[call-overload]
            held += found[-1][1] - found[-1][0] + 1
            if held >= chunk or len(found) == chunk:
                return found, found[-1][0]
        size = min(2 * size, 1 << (AREA_BITS - BUCKET_BITS))
    return found, None


def _page(database: db.Database, query: Query, before: int | None, chunk: int) -> tuple[list[tuple[object, ...]], int | None, bool, int]:
    """One statement's worth of a query: (rows newest first, the cursor after them, whether
    older rows may match, how many rows SQL looked at, at least).

    On grant, `sub` or repository, three sources merged by id: the spans with a bucket (the
    areas of the value queried, then their buckets' spans), the spans without (written
    before buckets, or by a replica not yet upgraded), and the rows written without spans.
    Each source has given every row or span it has from its floor up (the lowest id it
    reached, when it may have older ones), so the page stops at the highest floor. The rows
    of the fewest newest spans that hold `chunk` rows are read by id; SPAN_SCAN rows when
    SQL also filters the rows (event, time), which may keep few of them.

    What SQL looked at counts a span's rows, matching or not: a query for refusals of a
    `sub` that has millions of mints and no refusal stops at MAX_SCAN with a cursor (it had
    read all of them, a page of `chunk` rows at a time: 4.4 s for 2M rows)."""
    if not any(key in query.criteria for key in _SPANNED):
        with database.transaction(write=False) as tx:
            rows = tx.execute(*statement(query, before, chunk))
        return rows, _row_id(rows[-1]) if rows else before, len(rows) == chunk, len(rows)
    floors: list[int] = []
    with database.transaction(write=False) as tx:
        unspanned = tx.execute(*statement(query, before, chunk, unspanned=True))
        if len(unspanned) == chunk:
            floors.append(_row_id(unspanned[-1]))
        budget = max(chunk, SPAN_SCAN) if _where(query, {"event": "event"})[0] else chunk
        old = [(int(f), int(last)) for f, last in tx.execute(*spans_statement(query, before, budget))]  # type: ignore[call-overload]
        if len(old) == budget:
            floors.append(old[-1][0])
        new, floor = _bucketed_spans(tx, query, before, budget)
        if floor is not None:
            floors.append(floor)
        least = max(floors, default=None)
        spans = sorted((s for s in [*old, *new] if least is None or s[0] >= least), reverse=True)
        spanned: list[tuple[object, ...]] = []
        held = 0
        for n, (first, last) in enumerate(spans):
            held += last - first + 1
            if held >= budget:
                del spans[n + 1:]
                floors.append(first)
                break
        per = max(1, len(spans)) if database.dialect == "postgresql" else (db.SQLITE_PARAMETERS - len(_where(query)[1]) - 2) // 2
        for at in range(0, len(spans), per):  # newest spans first: each statement's rows are older than the last's
            spanned += tx.execute(*rows_statement(query, before, spans[at:at + per], chunk - len(spanned), database.dialect))
            if len(spanned) == chunk:
                floors.append(_row_id(spanned[-1]))
                break
    floor = max(floors, default=None)
    rows = [r for r in heapq.merge(spanned, unspanned, key=_row_id, reverse=True) if floor is None or _row_id(r) >= floor][:chunk]
    looked = held + len(unspanned)
    if len(rows) == chunk:
        return rows, _row_id(rows[-1]), True, looked
    return rows, floor if floor is not None else before, floor is not None, looked


def _row_id(row: tuple[object, ...]) -> int:
    return int(row[0])  # type: ignore[call-overload]


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
        rows, cursor, older, looked = _page(database, query, cursor, chunk)
        scanned += looked
        for row in rows:
            try:
                entry = jsontext.loads(str(row[1]))
            except ValueError:
                continue
            if isinstance(entry, dict) and query.matches(entry):
                found.append((_row_id(row), entry))
                if len(found) > limit:
                    break
        if len(found) > limit:
            found = found[:limit]
            more: int | None = found[-1][0]
            break
        if not older:
            more = None
            break
        if scanned >= MAX_SCAN:
            more = cursor
            break
    # Paged in the database's order; shown in time order (a push is committed at once,
    # the mint that bought its token may be added by a flush a second later).
    entries = sorted((entry for _, entry in reversed(found)), key=lambda e: str(e.get("time", "")))
    return entries, more
