"""The agent's database: SQLite in its state dir (one machine) or PostgreSQL (a fleet).

One seam for every table the agent keeps. A component (grants, the audit trail, and
whatever comes next: trust policies, push audit) owns a list of migrations, each one SQL
script; `Database.open` applies the missing ones in order, in one transaction per
component, under a lock so replicas starting together migrate once. The version each
component has reached is in `codestore_schema`; a database whose schema is newer than
this code, or that holds tables but no `codestore_meta` row naming codestore, is refused
at start in one line (a foreign or damaged database is never written to).

SQL is written once with `?` placeholders and these words, filled in per dialect:

    {id}      an auto-numbered primary key column type
    {bigint}  a 64-bit integer

A state change is acknowledged only after `transaction()` has committed; a failed write
raises `StoreError` and rolls back, so nothing refused is kept. Every PostgreSQL
statement has a deadline (ANSWER_DEADLINE, `_Watchdog`): a server that hangs without
closing its connections fails the call with StoreError instead of holding its thread.

PostgreSQL is an optional extra (`codestore-git[fleet]`: psycopg 3); SQLite is the standard
library's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

from ..errors import CodestoreError, ConfigError, redact

APP = "codestore-agent"
DB_FILE = "agent.sqlite3"
POOL_SIZE = 8
CONNECT_TIMEOUT = 3  # seconds: a replica must notice a dead database quickly
STATEMENT_TIMEOUT_MS = 5000
# The agent's own, whatever the server's default: a paced flush waits up to 20 ms between
# its statements (GrantStore._pace), and a server or managed service with a shorter
# idle_in_transaction_session_timeout ended every such session, and the schema check's at
# start. Past this, a session of ours idle in a transaction is a stuck one: the server
# ends it and frees its row locks.
IDLE_IN_TRANSACTION_MS = 30_000
# Seconds a PostgreSQL statement may go unanswered before the agent gives up on the
# connection (_Watchdog). Past the server's own statement timeout, so that a slow but
# running server ends a slow statement itself, with its own error and the connection kept;
# the second more is for that error's way back. Only a server that cannot answer at all
# (stopped, a paused VM, a storage stall holding every backend) reaches it.
ANSWER_DEADLINE = STATEMENT_TIMEOUT_MS / 1000 + 1.0
WATCH_TICK = 0.25  # how often the watchdog looks: a deadline is met within this much

_DIALECT_WORDS = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT"},
}

# component -> ordered migrations. Append, never edit a released one.
MIGRATIONS: dict[str, list[str]] = {}


def register(component: str, migrations: Sequence[str]) -> None:
    """Declare a component's schema; called at import time by the module that owns it."""
    MIGRATIONS[component] = list(migrations)


class StoreError(CodestoreError):
    """The database could not be reached or written; nothing was changed, unless
    `maybe_committed`: its COMMIT was sent and never answered (a hung server may still run it)."""

    exit_code = 1
    maybe_committed = False

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        # What to tell a caller who is not the owner (a sandbox): what failed, without the
        # database's address or the driver's words, which the message has for the owner.
        self.public = public or message


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[object] = ...) -> object: ...
    def fetchall(self) -> list[tuple[object, ...]]: ...
    def fetchone(self) -> tuple[object, ...] | None: ...


ROWS_PER_STATEMENT = 100  # SQLite: rows a statement, at most (and at most SQLITE_PARAMETERS values)
SQLITE_PARAMETERS = 999  # SQLite's limit of parameters a statement before 3.32 (Ubuntu 20.04 has 3.31)
# PostgreSQL: psycopg turns a statement's arrays into its wire format in one call that holds
# the GIL throughout, 2.2 us a row here; 250 rows hold it about half a millisecond.
PG_ROWS_PER_STATEMENT = 250
# PostgreSQL: rows a COPY of `Tx.insert_rows`, about a quarter of a millisecond of the GIL.
PG_COPY_ROWS = 250


def _at_once(left: int) -> None:
    pass


class Tx:
    """A transaction's handle: `?`-style SQL, rows as tuples."""

    def __init__(self, db: Database, cur: Cursor) -> None:
        self._db = db
        self._cur = cur
        # Called between a long write's statements with how many are still to come (a
        # PostgreSQL flush's: GrantStore._pace spreads them); by default at once.
        self.pace: Callable[[int], None] = _at_once

    @property
    def one_writer(self) -> bool:
        return self._db.one_writer

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        self._cur.execute(self._db.sql(sql), tuple(params))
        try:
            return list(self._cur.fetchall())
        except Exception:  # noqa: BLE001 - a statement without rows (psycopg raises, sqlite returns [])
            return []

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._cur.executemany(self._db.sql(sql), [tuple(r) for r in rows])  # type: ignore[attr-defined]

    def execute_rows(self, sql: str, types: Sequence[str], rows: Sequence[Sequence[object]], per: int = ROWS_PER_STATEMENT) -> None:
        """`sql` with `{rows}` standing for `rows` as a table `v` (columns column1.. of SQL `types`).

        For the background flushes. executemany runs one statement per row, and the
        driver gives up the GIL for each: while the event loop holds it minting tokens,
        every hand-back waits out the switch interval (5 ms), so a second's thousands of
        rows took seconds and held the replica's grant poll back past its freshness limit.

        PostgreSQL: one array parameter a column (unnest), PG_ROWS_PER_STATEMENT rows a
        statement. psycopg parses a statement of more than 50 parameters in Python on every
        call (it caches only smaller ones): a hundred rows a statement held the GIL ~5 ms a
        statement, and a second's flush stalled the event loop for 40-60 ms. And it turns
        the arrays into their wire format in one call that keeps the GIL to itself (no
        switch interval): a second's 14k audit rows in one statement held it 30 ms, in
        which the event loop answered nothing (measured: the loop thread waiting on the
        GIL for the whole of a 39 ms stall). Between statements the GIL is free while the
        server works.
        SQLite: VALUES lists of `per` rows, then powers of two: a few statement shapes, so
        the driver's statement cache holds them all instead of compiling one per flush.
        """
        if not rows:
            return
        if self._db.dialect == "postgresql":
            names = ", ".join(f"column{n}" for n in range(1, len(types) + 1))
            arrays = ", ".join(f"CAST(%b AS {t}[])" for t in types)
            statement = sql.replace("{rows}", f"unnest({arrays}) AS v({names})")
            for i in range(0, len(rows), PG_ROWS_PER_STATEMENT):
                self.execute(statement, [list(column) for column in zip(*rows[i:i + PG_ROWS_PER_STATEMENT], strict=True)])
            return
        row = f"({', '.join('?' * len(types))})"
        per = min(per, SQLITE_PARAMETERS // len(types))
        i = 0
        while i < len(rows):
            n = min(per, 1 << (len(rows) - i).bit_length() - 1)
            chunk = rows[i:i + n]
            i += n
            self.execute(sql.replace("{rows}", f"(VALUES {', '.join([row] * n)}) AS v"), [v for r in chunk for v in r])

    def new_ids(self, table: str, n: int) -> list[int]:
        """`n` ids for new rows of `table` (its `{id}` column), increasing, that no other row
        has or will get: known before the insert, for rows that must name each other (the
        audit's spans). SQLite: after the largest the table has had, under the transaction's
        write lock, so they are consecutive. PostgreSQL: from the table's sequence; another
        session may take numbers between them at the same time."""
        if n <= 0:
            return []
        if self._db.dialect == "postgresql":
            sequence = self._db.sequences.get(table)
            if sequence is None:
                sequence = self._db.sequences[table] = str(self.execute("SELECT pg_get_serial_sequence(?, 'id')", [table])[0][0])
            # The numbers themselves only when they are not one run: 2000 of them cost this
            # client a millisecond to read.
            low, high, scattered = self.execute(
                "SELECT min(v), max(v), CASE WHEN max(v) - min(v) + 1 = count(*) THEN NULL ELSE array_agg(v) END "
                "FROM (SELECT nextval(CAST(? AS regclass)) AS v FROM generate_series(1, CAST(? AS integer))) AS taken",
                [sequence, n])[0]
            if scattered is not None:
                return sorted(scattered)  # type: ignore[call-overload]
            return list(range(int(low), int(high) + 1))  # type: ignore[call-overload]
        last = self.execute(f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0), "
                            f"coalesce((SELECT max(id) FROM {table}), 0))", [table])[0][0]
        return list(range(int(last) + 1, int(last) + 1 + n))  # type: ignore[call-overload]

    def insert_rows(self, table: str, types: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """`rows` into `table` ("name (column, ...)", columns of SQL `types`): the flush's audit rows.

        PostgreSQL: COPY FROM STDIN in binary, PG_COPY_ROWS rows a COPY, each under the
        deadline a statement has. psycopg writes a row in C, a call a row, so the GIL can
        change hands between rows; `execute_rows` turns a statement's arrays into their wire
        format in one call. A second's 13k audit rows cost this client 22-25 ms of CPU
        instead of 41-50 (the agent's flush thread, beside the event loop that mints).
        Bigger COPYs cost less still, but held the GIL in slices up to the switch interval
        (5 ms), and the agent's p99 rose: docs/fleet.md has the numbers.
        SQLite: `execute_rows`'s INSERT (in-process; no COPY).
        """
        if not rows:
            return
        if self._db.dialect != "postgresql":
            self.execute_rows(f"INSERT INTO {table} SELECT * FROM {{rows}}", types, rows)
            return
        statement = f"COPY {table} FROM STDIN (FORMAT BINARY)"
        for i in range(0, len(rows), PG_COPY_ROWS):
            self._cur.copy_rows(statement, types, rows[i:i + PG_COPY_ROWS])  # type: ignore[attr-defined]


_LIBPQ_WORDS = re.compile(r"\s*(host|hostaddr|port|dbname|user|password|passfile|sslmode|service|connect_timeout|options)\s*=")
_PASSWORD = re.compile(r"://[^:/@]*:([^/?#]*)@")  # userinfo's password, to the authority's last @ (an unescaped one in it)
_PASSWORD_PARAM = re.compile(r"(?i)[?&](?:ssl)?password=([^&]*)")  # libpq's password= and sslpassword=


def _mask(m: re.Match[str]) -> str:
    """The match with its group 1 (a password) as ***."""
    whole, at = m.group(0), m.start(0)
    return whole[: m.start(1) - at] + "***" + whole[m.end(1) - at:]


def describe(url: str) -> str:
    """The store's address without a password, for logs, status and refusals."""
    return _PASSWORD_PARAM.sub(_mask, _PASSWORD.sub(_mask, url))


def _passwords(url: str) -> list[str]:
    """The URL's passwords as written and decoded, longest first: a driver's error may quote either."""
    from urllib.parse import unquote

    found = [p for pattern in (_PASSWORD, _PASSWORD_PARAM) for p in pattern.findall(url) if p]
    return sorted({*found, *map(unquote, found)} - {""}, key=len, reverse=True)


BUSY_TIMEOUT = 10.0  # seconds a SQLite writer waits for another process's write to finish
POLL_MAX = 0.001  # seconds: the longest sleep of a writer polling for the lock (_begin_write)
YIELD_MAX = 0.1  # seconds a flush holds back for grant changes waiting for SQLite's lock
SHRINK_IDLE = 30.0  # seconds no process wrote SQLite's WAL before the flush thread cuts it back
SHRINK_OVER = 16 << 20  # bytes: a smaller WAL is left as it is
SYNCHRONOUS = "FULL"  # SQLite: a commit is on disk before we acknowledge a grant change (but see transaction)
SQLITE_BUSY = 5  # the primary result code (sqlite3.SQLITE_BUSY from Python 3.11)
SQLITE_DAMAGED = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


# Files libpq opens for a connection, by keyword: (its environment variable, its default
# under the home directory, when it reads it). libpq opens a file before it looks at what
# it is, so a named pipe there holds the connecting thread for ever: measured with
# psycopg's libpq 18 for passfile, PGPASSFILE, ~/.pgpass and the service files, with no
# timeout (connect_timeout counts the network only). The SSL files are opened by OpenSSL
# when the server takes SSL, the same way. Anything else that is not a file (a directory,
# a device, /dev/null) libpq opens at once and then ignores with a warning (measured).
_LIBPQ_FILES = {
    "passfile": ("PGPASSFILE", ".pgpass", "password"),
    "sslrootcert": ("PGSSLROOTCERT", ".postgresql/root.crt", "ssl"),
    "sslcert": ("PGSSLCERT", ".postgresql/postgresql.crt", "ssl"),
    "sslkey": ("PGSSLKEY", ".postgresql/postgresql.key", "ssl"),
    "sslcrl": ("PGSSLCRL", ".postgresql/root.crl", "ssl"),
}


def _file_problem(url: str, env: Mapping[str, str] = os.environ) -> str | None:
    """Why libpq would hang connecting with `url` (a file it opens that is a named pipe), as
    one line naming the file and the fix; None when no such file is a pipe (libpq goes on
    without a missing one, or says why itself), and when psycopg is missing or cannot read
    the URL (connecting says so)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except Exception:  # noqa: BLE001 - ImportError, or a URL psycopg refuses: psycopg.connect says why
        return None
    home = env.get("HOME") or os.path.expanduser("~")
    candidates: list[tuple[str, str]] = []  # (what names it, path)
    service = params.get("service") or env.get("PGSERVICE")
    if service:
        if env.get("PGSERVICEFILE"):
            candidates.append(("the service file (PGSERVICEFILE)", env["PGSERVICEFILE"]))
        else:
            candidates.append(("the service file", os.path.join(home, ".pg_service.conf")))
        if env.get("PGSYSCONFDIR"):  # without it, the directory libpq was built with
            candidates.append(("the service file (PGSYSCONFDIR)", os.path.join(env["PGSYSCONFDIR"], "pg_service.conf")))
        params = {**_service_params(service, [p for _, p in candidates]), **params}
    has_password = bool(params.get("password") or env.get("PGPASSWORD"))
    ssl = (params.get("sslmode") or env.get("PGSSLMODE") or "prefer") != "disable"
    for word, (var, default, when) in _LIBPQ_FILES.items():
        if (when == "password" and has_password) or (when == "ssl" and not ssl):
            continue
        if params.get(word):
            what, path = word, params[word]
        elif env.get(var):
            what, path = var, env[var]
        else:
            what, path = f"the default {word}", os.path.join(home, default)
        if not (word == "sslrootcert" and path == "system"):  # "system": OpenSSL's own store
            candidates.append((what, path))
    for what, path in candidates:
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            continue  # missing or unreadable: libpq goes on without it, or says why
        if stat.S_ISFIFO(mode):
            return f"--store: libpq would read {what} {path}, which is a pipe, and wait on it for ever; name a regular file, or remove it"
    return None


def _service_params(service: str, paths: list[str]) -> dict[str, str]:
    """The keywords a service file's section `service` sets (the first file that has it, as libpq reads them)."""
    import configparser

    for path in paths:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                continue  # refused by the caller
            parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#",), delimiters=("=",))
            parser.read(path, encoding="utf-8")
        except (OSError, ValueError, configparser.Error):
            continue
        if parser.has_section(service):
            return dict(parser.items(service))
    return {}


def _damaged(e: BaseException) -> bool:
    """Whether SQLite says the file is not a database it can read: no retry will mend it."""
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+; 3.10 has only the message
    return code & 0xFF in SQLITE_DAMAGED if code is not None else ("not a database" in str(e) or "malformed" in str(e))


def _restored(cur: sqlite3.Cursor) -> bool:
    """Whether a connection a non-durable transaction used is back to SYNCHRONOUS."""
    try:
        cur.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
    except sqlite3.Error:
        return False
    return True


def _begin_write(cur: sqlite3.Cursor) -> None:
    """BEGIN IMMEDIATE, waiting for another process's writer in steps of at most 5 ms.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms in turn:
    a `grant revoke` on one worker that found the other worker's flush writing (a few
    tens of ms) woke after 128 ms. Within one process a lock hands over at once (above).
    """
    cur.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + BUSY_TIMEOUT
        delay = 0.0005
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+; 3.10 has only the message
                busy = code & 0xFF == SQLITE_BUSY if code is not None else "locked" in str(e)
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
    finally:
        cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")


class _Watched:
    """A PostgreSQL transaction's cursor whose every statement the watchdog may end.

    `expired` is set (by the watchdog, under its lock) once a statement went unanswered
    past ANSWER_DEADLINE and its connection was shut down; `statement` is the last one sent.
    """

    __slots__ = ("_cur", "_dog", "expired", "fd", "statement", "until")

    def __init__(self, cur: Cursor, fd: int, dog: _Watchdog) -> None:
        self._cur, self.fd, self._dog = cur, fd, dog
        self.until = 0.0
        self.expired = False
        self.statement = ""

    def execute(self, sql: str, params: Sequence[object] | None = None) -> object:
        self.statement = sql
        self._dog.arm(self)
        try:
            return self._cur.execute(sql, params)  # type: ignore[arg-type]
        finally:
            self._dog.disarm(self)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.statement = sql
        self._dog.arm(self)
        try:
            self._cur.executemany(sql, rows)  # type: ignore[attr-defined]
        finally:
            self._dog.disarm(self)

    def copy_rows(self, statement: str, types: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A COPY ... FROM STDIN (FORMAT BINARY) of `rows`, under the deadline as a statement."""
        self.statement = statement
        self._dog.arm(self)
        try:
            with self._cur.copy(statement) as copy:  # type: ignore[attr-defined]
                copy.set_types(list(types))
                for row in rows:
                    copy.write_row(row)
        finally:
            self._dog.disarm(self)

    def fetchall(self) -> list[tuple[object, ...]]:
        return self._cur.fetchall()  # psycopg's client-side cursor: already read by execute

    def fetchone(self) -> tuple[object, ...] | None:
        return self._cur.fetchone()


class _Watchdog:
    """Ends a PostgreSQL statement the server has not answered within ANSWER_DEADLINE.

    A server that stops without closing its connections (SIGSTOP, a paused VM, a storage
    stall holding every backend) held a statement, and the thread waiting on it, forever:
    the kernel still acknowledges TCP, so keepalives and tcp_user_timeout see a live peer;
    the server's statement_timeout is the stopped server's to enforce; and a cancel request
    is a new connection the stopped postmaster never reads (psycopg's `cancel_safe` waits on
    exactly that). psycopg has no public per-statement client deadline. So one thread a
    process looks every WATCH_TICK and shuts down (shutdown(2), which acts on the socket
    whoever waits on it) the connection of a statement past its deadline: libpq's wait
    wakes at once to a closed connection, the statement fails, and the transaction
    discards the connection and raises StoreError. Started on the first statement, stopped
    by Database.close (the agent forks its workers after that, with no thread running).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, _Watched] = {}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def arm(self, w: _Watched) -> None:
        w.until = time.monotonic() + ANSWER_DEADLINE
        with self._lock:
            self._armed[id(w)] = w
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="store-watchdog", daemon=True)
                self._thread.start()

    def disarm(self, w: _Watched) -> None:
        with self._lock:
            self._armed.pop(id(w), None)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(WATCH_TICK):
            now = time.monotonic()
            with self._lock:  # held while shutting down: a disarmed connection is never touched
                for w in self._armed.values():
                    if now > w.until and not w.expired:
                        w.expired = True
                        _shut_down(w.fd)

    def stop(self) -> None:
        with self._lock:
            thread, stop, self._thread = self._thread, self._stop, None
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join()


def _shut_down(fd: int) -> None:
    """Shut down the socket behind `fd` (through a duplicate: the fd stays libpq's to close)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer, or gone: the statement fails either way


class Database:
    """A small pool of connections to one database, SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            if url.split("://", 1)[1].split("/", 1)[0].count("@") > 1:
                # The driver takes the last part for the host, and its error quoted the rest:
                # a piece of the password.
                raise ConfigError(f"the --store URL {describe(url)} has more than one '@' before its host; "
                                  "write an '@' in the user name or password as %40")
            if (problem := _file_problem(url)) is not None:
                raise ConfigError(problem)
        elif "://" in url and not url.startswith("sqlite://"):
            raise ConfigError(f"--store takes postgresql://... or a file path, not {describe(url)[:60]!r}")
        elif _LIBPQ_WORDS.match(url):
            # Taken as a file name, it made a local SQLite store (its password in the name):
            # replicas an operator meant to share PostgreSQL would each keep their own grants.
            raise ConfigError("--store looks like a libpq key=value string, which is not read here; "
                              "give it as a URL: postgresql://USER@HOST:PORT/DBNAME (the password in PGPASSWORD or ~/.pgpass)")
        else:
            self.dialect = "sqlite"
            self.path = url.removeprefix("sqlite://")
        self._pool: queue.LifoQueue[object] = queue.LifoQueue()
        self._words = _DIALECT_WORDS[self.dialect]
        self._lock = threading.Lock()  # SQLite: one writer connection, serialised
        self.sequences: dict[str, str] = {}  # PostgreSQL: a table's id sequence, by table (Tx.new_ids)
        self._passwords = _passwords(url)
        self._watchdog = _Watchdog()  # PostgreSQL: statements the server does not answer

    def __repr__(self) -> str:
        return f"Database({describe(self.url)!r})"

    @property
    def one_writer(self) -> bool:
        """Whether a write transaction holds the whole store's one write lock (SQLite), so
        that background writes go in short transactions; PostgreSQL locks rows."""
        return self.dialect == "sqlite"

    @property
    def where(self) -> str:
        return describe(self.url) if self.dialect == "postgresql" else self.path

    def sql(self, text: str) -> str:
        text = text.format(**self._words) if "{" in text else text
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> object:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            # FULL: a commit is on disk before we acknowledge a grant change.
            conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            # No checkpoint on a commit: by default the commit that takes the WAL past 1000
            # pages copies it into the database and syncs it, and that was a `grant create`
            # taking 126 ms after a load. The grant store's flush thread checkpoints instead.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA foreign_keys=ON")
            # A flush's INSERT ... SELECT FROM (VALUES ...) builds a temporary table and a
            # statement journal: in files under /var/tmp by default, two page writes a minted
            # token. A flush's rows are at most a few hundred kilobytes.
            conn.execute("PRAGMA temp_store=MEMORY")
            return conn
        try:
            import psycopg
        except ImportError:
            raise ConfigError("--store postgresql://... needs psycopg: pip install 'codestore-git[fleet]'") from None
        from psycopg.conninfo import conninfo_to_dict

        if (problem := _file_problem(self.url)) is not None:  # became one since the start: refused, not hung
            raise psycopg.OperationalError(problem)
        # Added to the URL's own `options` (a search_path, say), which a keyword would replace.
        options = (f"{conninfo_to_dict(self.url).get('options') or ''} -c statement_timeout={STATEMENT_TIMEOUT_MS}"
                   f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}").strip()
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, options=options, application_name="codestore-agent",
        )

    def _get(self) -> object:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return self._connect()

    def _put(self, conn: object) -> None:
        if self._pool.qsize() < POOL_SIZE:
            self._pool.put(conn)
        else:
            conn.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._watchdog.stop()
        while True:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                return
            try:
                conn.close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect == "sqlite":
            return (sqlite3.Error, OSError)
        import psycopg

        return (psycopg.Error, OSError)

    @contextmanager
    def transaction(self, *, write: bool = True, durable: bool = True) -> Iterator[Tx]:
        """A committed-or-nothing transaction; database failures become StoreError.

        `durable=False` (SQLite): the commit does not wait for the disk. A process killed
        after it loses nothing (the WAL is in the kernel's page cache); power lost within
        the next sync may lose the transaction, never the database's consistency. For the
        flush's audit rows and use counts, whose JSON-lines file is not synced either:
        waiting for the disk held the one write lock 5-14 ms a transaction, and a `grant
        create` waited behind it. The next durable commit or checkpoint syncs them too.
        """
        errors = self._errors()
        relax = not durable and self.dialect == "sqlite"
        lock = self._lock if (self.one_writer and write) else None
        # A durable writer says it waits before it waits for its own process's lock too: the
        # other processes' flushes hold back while this one's flush transaction ends, so it
        # waits for one flush transaction, not for one here and then one there.
        announced = contextlib.ExitStack()
        if lock and not relax:
            announced.enter_context(self._waiting_writer())
        elif relax:
            self._let_writers_first()
        if lock:
            lock.acquire()
        try:
            try:
                conn = self._get()
            except errors as e:
                raise StoreError(self._unreachable(e), self._public(e)) from None
            cur = conn.cursor()  # type: ignore[attr-defined]
            ok = False
            try:
                if self.dialect == "postgresql":
                    # Every statement here and in Tx, BEGIN to ROLLBACK, has a deadline.
                    cur = _Watched(cur, conn.pgconn.socket, self._watchdog)  # type: ignore[attr-defined]
                if relax:
                    cur.execute("PRAGMA synchronous=NORMAL")  # this connection's; FULL again below
                if lock:
                    _begin_write(cur)
                    announced.close()  # the write lock is ours
                else:
                    cur.execute("BEGIN")
                yield Tx(self, cur)
                cur.execute("COMMIT")
                ok = True
            except errors as e:
                if not getattr(cur, "expired", False):
                    try:
                        cur.execute("ROLLBACK")
                    except errors:
                        pass
                failure = StoreError(self._failed(e, cur), self._public(e, cur))
                failure.maybe_committed = isinstance(cur, _Watched) and cur.expired and cur.statement == "COMMIT"
                raise failure from None
            finally:
                if getattr(cur, "expired", False):
                    self._discard(conn)  # shut down: never back into the pool
                else:
                    if not ok:
                        try:
                            cur.execute("ROLLBACK")
                        except Exception:  # noqa: BLE001, S110 - already rolled back, or the connection is gone
                            pass
                    if relax and not _restored(cur):
                        conn.close()  # type: ignore[attr-defined]  # not back into the pool as it is
                    elif ok:
                        self._put(conn)
                    else:
                        self._discard(conn)
        finally:
            announced.close()
            if lock:
                lock.release()

    def _discard(self, conn: object) -> None:
        if self.dialect == "sqlite":
            self._put(conn)  # a local file: the connection itself is fine
            return
        try:
            conn.close()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S110
            pass

    def _detail(self, e: BaseException) -> str:
        text = " ".join(str(e).split())
        for password in self._passwords:
            text = text.replace(password, "***")
        return redact(text)[:160] or type(e).__name__

    def _public(self, e: BaseException, cur: object = None) -> str:
        """_unreachable's or _failed's message as a sandbox may read it (StoreError.public)."""
        if isinstance(cur, _Watched) and cur.expired:
            return "the grant store did not answer in time"
        if self.dialect == "sqlite" and _damaged(e):
            return "the grant store is damaged"
        return "the grant store is unreachable" if cur is None else "the grant store failed"

    def _unreachable(self, e: BaseException) -> str:
        return self._damage(e) or f"the grant store {self.where} is unreachable ({self._detail(e)})"

    def _damage(self, e: BaseException) -> str | None:
        """A damaged SQLite file, and what to do about it; None for any other failure."""
        if self.dialect != "sqlite" or not _damaged(e):
            return None
        return (f"the grant store {self.path} is damaged ({self._detail(e)}); restore it from a backup, or move it "
                "away and start the agent again to begin a new one (its grants are lost; the audit log keeps their history)")

    def _failed(self, e: BaseException, cur: object = None) -> str:
        if isinstance(cur, _Watched) and cur.expired:
            # The server may still run what it had read once it answers again: a commit too.
            maybe = "; the change may still be committed when it answers" if cur.statement == "COMMIT" else ""
            return f"the grant store {self.where} did not answer within {ANSWER_DEADLINE:g} s{maybe}"
        return self._damage(e) or f"the grant store {self.where} failed ({self._detail(e)})"

    def _writers(self) -> int | None:
        """A descriptor of its own on `<database>-writers` (a flock is per open file, so each
        waiter opens it), or None where it cannot be made: then nobody holds back."""
        try:
            return os.open(self.path + "-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None

    @contextmanager
    def _waiting_writer(self) -> Iterator[None]:
        """SQLite: while a durable writer (a grant change) waits for the write lock, every
        process's non-durable writers (flushes) hold back (_let_writers_first): a shared
        flock on `<database>-writers`, which a flush probes for exclusively. With two
        workers draining their flushes after a load, a `grant create` polling for the lock
        against the other worker's flush transactions waited 22-36 ms (p99); 15-20 since."""
        fd = self._writers()
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _let_writers_first(self) -> None:
        """Wait (at most YIELD_MAX) while a durable writer of any process waits for the lock."""
        fd = self._writers()
        if fd is None:
            return
        try:
            deadline = time.monotonic() + YIELD_MAX
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.001)
                    continue
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)

    def sync_log(self) -> None:
        """SQLite: put on disk what non-durable transactions (`transaction(durable=False)`)
        left in the WAL, holding no lock: otherwise the next durable commit syncs all of it
        while it holds the write lock (a `grant create` after a load took 70-90 ms). A sync
        of the file through a descriptor of our own: SQLite has no call that syncs the WAL
        without a checkpoint. PostgreSQL: nothing."""
        if self.dialect != "sqlite":
            return
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no WAL (yet): nothing to sync
        except OSError as e:
            raise StoreError(f"cannot open the grant store's log {self.path}-wal ({e.strerror})", "the grant store failed") from None
        try:
            (getattr(os, "fdatasync", None) or os.fsync)(fd)  # macOS has no fdatasync
        except OSError as e:
            raise StoreError(f"cannot sync the grant store's log {self.path}-wal ({e.strerror})", "the grant store failed") from None
        finally:
            os.close(fd)

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database (PASSIVE: never waits for, nor holds up, a
        writer), off the request path; StoreError when it fails. PostgreSQL: nothing."""
        if self.dialect != "sqlite":
            return
        try:
            conn = self._get()
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[attr-defined]
            finally:
                self._put(conn)
        except sqlite3.Error as e:
            raise StoreError(self._failed(e), self._public(e)) from None

    def shrink_log(self) -> bool:
        """SQLite: once no process has written for SHRINK_IDLE seconds, cut a WAL larger
        than SHRINK_OVER back to nothing (a TRUNCATE checkpoint), waiting for no one: a reader
        or writer in the way leaves it for a later call. Whether it was cut.

        SQLite reuses its WAL from the start but never shrinks it, so without this the file
        keeps the size of the longest run of writes between two restarts (hundreds of MiB
        under sustained load). Cutting it costs the time to free the file's blocks (120 ms
        for 700 MiB here), which is why it waits for a quiet store, not for a size.
        PostgreSQL: nothing."""
        if self.dialect != "sqlite":
            return False
        try:
            log = os.stat(self.path + "-wal")
        except OSError:
            return False  # no WAL (yet)
        if log.st_size < SHRINK_OVER or time.time() - log.st_mtime < SHRINK_IDLE:
            return False
        try:
            conn = self._get()
            try:
                conn.execute("PRAGMA busy_timeout=0")  # type: ignore[attr-defined]
                try:
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]  # type: ignore[attr-defined]
                finally:
                    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")  # type: ignore[attr-defined]
            finally:
                self._put(conn)
        except sqlite3.Error as e:
            raise StoreError(self._failed(e), self._public(e)) from None
        return not busy

    # -- schema ------------------------------------------------------------------------

    def open(self) -> Database:
        """Connect, refuse a foreign or newer database, apply missing migrations."""
        if self.dialect == "sqlite":
            self._check_sqlite_file()
        try:
            with self.transaction() as tx:
                if self.dialect == "postgresql":
                    # Replicas starting together: one migrates, the others wait.
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (0x636F6465,))
                tables = self._tables(tx)
                if "codestore_meta" not in tables:
                    if tables:
                        raise ConfigError(
                            f"{self.where} holds tables that are not codestore's ({', '.join(sorted(tables)[:3])}); "
                            "give the agent its own database (--store)"
                        )
                    tx.execute("CREATE TABLE codestore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                    tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('app', ?)", (APP,))
                    tx.execute("CREATE TABLE codestore_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
                app = tx.execute("SELECT value FROM codestore_meta WHERE key = 'app'")
                if not app or app[0][0] != APP:
                    raise ConfigError(f"{self.where} is not a codestore agent database; give the agent its own (--store)")
                versions: dict[str, int] = dict(tx.execute("SELECT component, version FROM codestore_schema"))  # type: ignore[arg-type]
                if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in versions.values()):
                    raise ConfigError(f"{self.where} is damaged (a schema version that is no version); "
                                      "restore it from a backup, or move it away for a new one")
                from . import audit, grants, trust  # noqa: F401  # each registers its part of the schema (register)

                unknown = sorted(set(versions) - set(MIGRATIONS))
                if unknown:  # a part of the store this codestore does not know: written by a newer one
                    raise ConfigError(f"{self.where} was written by a newer codestore (its schema has {', '.join(map(str, unknown[:3]))}, "
                                      "which this one does not know); upgrade codestore on this replica")
                for component, steps in MIGRATIONS.items():
                    have = int(versions.get(component, 0))
                    if have > len(steps):
                        raise ConfigError(
                            f"{self.where} was written by a newer codestore ({component} schema v{have}, this one knows "
                            f"v{len(steps)}); upgrade codestore on this replica"
                        )
                    for step in steps[have:]:
                        for statement in filter(None, (s.strip() for s in step.split(";"))):
                            tx.execute(statement)
                    if have == 0:
                        tx.execute("INSERT INTO codestore_schema (component, version) VALUES (?, ?)", (component, len(steps)))
                    elif have < len(steps):
                        tx.execute("UPDATE codestore_schema SET version = ? WHERE component = ?", (len(steps), component))
            if self.dialect == "sqlite":
                # Readers never wait for the writer. Set only once the file is known to be ours
                # (it changes the file's header).
                conn = self._get()
                conn.execute("PRAGMA journal_mode=WAL")  # type: ignore[attr-defined]
                self._put(conn)
        except StoreError as e:
            raise ConfigError(f"cannot start: {e}") from None
        except sqlite3.Error as e:
            raise ConfigError(f"cannot start: {self._failed(e)}") from None
        return self

    def _tables(self, tx: Tx) -> set[str]:
        if self.dialect == "sqlite":
            rows = tx.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        else:
            rows = tx.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return {str(r[0]) for r in rows}

    def _check_sqlite_file(self) -> None:
        try:
            from ..files import open_nonblocking

            with open(open_nonblocking(self.path), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # /dev/null read as empty, then "disk I/O error"
                    raise ConfigError(f"the grant store {self.path} is not a regular file; pass --store a file path (or a directory's)")
                head = f.read(16)
        except FileNotFoundError:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)  # private before SQLite writes to it
            os.close(fd)
            return
        except IsADirectoryError:
            raise ConfigError(f"the grant store {self.path} is a directory; move it away or pass another --store") from None
        except OSError as e:
            raise ConfigError(f"cannot read the grant store {self.path} ({e.strerror}); check its permissions") from None
        # An empty file is a new database, to SQLite and here: it is what a crash leaves
        # between creating the file (above) and SQLite's first write, so an agent killed in
        # its first start starts again. It holds no grant, so nothing is lost by starting
        # afresh, and a store that knows no grant mints under none.
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"the grant store {self.path} is not an SQLite database (damaged or foreign); move it away or restore it")
