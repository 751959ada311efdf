"""The audit trail: one record per mint, refusal and grant change.

Records carry who (grant id, `sub`, peer), what (repo, namespace, scopes, TTL) and the
result or the reason for a refusal: never a token or a grant secret. The agent builds
entries from request fields it has already validated, and passes reasons through
`errors.redact` in case a caller managed to put a token-shaped string into one.

Two places hold it, for two readers:

- the `audit` table of the agent's database, shared by replicas and queried by
  `codestore audit`: grant changes are written in the same transaction as the change
  itself (a grant never exists without its record); mints and refusals are buffered
  and added in batches by the store's flush (every second), so the database is not
  written once per token;
- a JSON-lines file (`--audit-log`, default in the state dir), appended at once with
  O_APPEND, for `tail -f` and log shippers, and as the record of mints a SIGKILLed
  replica had not flushed yet.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from ..errors import UsageError, redact
from . import db

MAX_BUFFER = 100_000  # rows waiting for the database; beyond it the file alone has them

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
])

_INSERT = "INSERT INTO audit (time, event, grant_id, sub, repo, result, replica, fields) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


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
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.counts: dict[str, int] = {"mint": 0, "refuse": 0}
        self.dropped = 0

    def _entry(self, event: str, fields: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
        now = time.time()
        entry: dict[str, object] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "event": event}
        entry.update(fields)
        if isinstance(entry.get("reason"), str):
            entry["reason"] = redact(str(entry["reason"]))
        text = json.dumps(entry, separators=(",", ":"), default=str)
        row = (int(now), event, entry.get("grant"), entry.get("sub"), entry.get("repo"), entry.get("result"), self.replica, text)
        return text, tuple(None if v is not None and not isinstance(v, (str, int)) else v for v in row)

    def _append(self, text: str) -> None:
        os.write(self._fd, (text + "\n").encode("utf-8"))

    def record(self, event: str, fields: Mapping[str, object]) -> None:
        """A mint or refusal: to the file now (OSError if it cannot be), to the database soon."""
        text, row = self._entry(event, fields)
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
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
                self.counts[event] = self.counts.get(event, 0) + 1
                try:
                    self._append(text)
                except OSError as e:
                    return f"the audit log file {self.path} could not be written ({e.strerror}); the database has the record"
            return None

        return write, after

    def flush_into(self, tx: db.Tx) -> Callable[[], None]:
        """Insert the buffered rows in `tx`; the returned callback forgets them once committed."""
        with self._lock:
            batch = list(self._buffer)
        if batch:
            tx.execute_rows(_INSERT.partition(" VALUES ")[0], _INSERT.partition(" VALUES ")[2], batch)

        def committed() -> None:
            with self._lock:
                del self._buffer[: len(batch)]

        return committed

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
