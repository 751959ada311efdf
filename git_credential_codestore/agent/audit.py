"""The audit log: one JSON line per mint, refusal and grant change.

Lines carry who (grant id, `sub`, peer), what (repo, namespace, scopes, TTL) and the
result or the reason for a refusal: never a token or a grant secret. The agent builds
entries from request fields it has already validated, and passes reasons through
`errors.redact` in case a caller managed to put a token-shaped string into one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping

from ..errors import redact


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        # O_APPEND: each line lands whole even if another process appends too.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"mint": 0, "refuse": 0}

    def record(self, event: str, fields: Mapping[str, object]) -> None:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
        }
        entry.update(fields)
        if isinstance(entry.get("reason"), str):
            entry["reason"] = redact(str(entry["reason"]))
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            os.write(self._fd, line)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
