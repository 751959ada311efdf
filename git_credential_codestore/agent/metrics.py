"""The agent's counters, and `/metrics` in Prometheus' text exposition format (0.0.4).

Written out by hand: the format is a few lines of text, and the agent runs on installs
without the fleet extra too, so it takes no client library for it.

Under `agent serve --workers N` the agent is N processes, and a scrape is answered by
whichever accepts it; it must still see the agent's totals, never one worker's (a counter
that jumps between workers' values goes backwards). So the counters live in a `Table`:
one fixed-layout slot of int64s per worker, in memory the parent maps shared before it
forks. Each worker writes only its own slot (under its own thread lock, as one process
always did: no lock between processes on the token path) and a scrape sums the slots.
Every counter in a slot only grows and is one aligned 8-byte word, so each sum is
monotonic whoever reads it. A slot is never reset: a worker started again in the slot of one that
died continues from its values (the counts its parts keep restart at 0, so it publishes them
on top of what the slot held), and the parent, between the two, clears the dead worker's
gauges and counts the restart. One process (`--workers 1`) has a one-slot table in
private memory, the same code at the same cost.
"""

from __future__ import annotations

import mmap
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Mapping

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# HTTP status of a refusal -> the reason label on codestore_agent_tokens_refused_total.
REASONS = {400: "bad_request", 401: "unauthenticated", 403: "beyond_grant", 409: "mismatch", 429: "rate_limited",
           503: "unavailable", 500: "internal"}
OTHER = "other"  # a refusal with a status not in REASONS
REFUSALS = tuple(sorted({*REASONS.values(), OTHER}))

# A slot's fields (int64 each). Latency is kept per bucket (not cumulated: one increment a
# token) plus one past the largest bound, and its sum in nanoseconds.
_MINTED = 0
_REFUSED = 1
_BUCKET = _REFUSED + len(REFUSALS)
_SUM_NS = _BUCKET + len(BUCKETS) + 1
_SIGNER_ERRORS = _SUM_NS + 1
# Counts other parts of a worker keep (its store, audit log and front), copied into its slot
# by `publish` every second and before it answers a scrape.
_STORE_ERRORS = _SIGNER_ERRORS + 1
_AUDIT_DROPPED = _STORE_ERRORS + 1
_IN_FLIGHT = _AUDIT_DROPPED + 1
_AUDIT_BUFFERED = _IN_FLIGHT + 1
_GRANT_READS = _AUDIT_BUFFERED + 1
_RESTARTS = _GRANT_READS + 1  # written by the parent, only while the slot's worker is dead
_FIELDS = _RESTARTS + 1
_SLOT = -(-_FIELDS * 8 // 64) * 64  # bytes, whole cache lines: workers never write the same line
_REFUSED_FIELD = {status: _REFUSED + REFUSALS.index(reason) for status, reason in REASONS.items()}
_REFUSED_OTHER = _REFUSED + REFUSALS.index(OTHER)


class Table:
    """One slot per worker, in memory shared with the processes forked after it is made."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.pid = os.getpid()  # the agent as a whole: the process that forks the workers
        size = workers * _SLOT
        # MAP_SHARED (anonymous): a fork shares these pages instead of copying them.
        memory = mmap.mmap(-1, size, flags=mmap.MAP_SHARED) if workers > 1 else bytearray(size)
        whole = memoryview(memory)
        self.slots = [whole[i * _SLOT:(i + 1) * _SLOT].cast("q") for i in range(workers)]

    def died(self, slot: int) -> None:
        """The worker of `slot` is dead (the parent, before starting another in it): its gauges go, a restart counts."""
        fields = self.slots[slot]
        fields[_IN_FLIGHT] = fields[_AUDIT_BUFFERED] = 0
        fields[_RESTARTS] += 1

    def totals(self) -> list[int]:
        """Each field summed over the slots (one read of each word)."""
        return [sum(slot[f] for slot in self.slots) for f in range(_FIELDS)]


class Metrics:
    """One worker's counters (its slot of `table`), and the agent's totals for a scrape."""

    def __init__(self, table: Table | None = None, slot: int = 0) -> None:
        self._lock = threading.Lock()
        self.table = table or Table()
        self._slot = self.table.slots[slot]
        self._base = (self._slot[_STORE_ERRORS], self._slot[_AUDIT_DROPPED], self._slot[_GRANT_READS])  # a dead predecessor's counts

    def observe(self, status: int, seconds: float) -> None:
        """One token request: its outcome and how long the agent took over it."""
        slot = self._slot
        with self._lock:
            slot[_MINTED if status == 200 else _REFUSED_FIELD.get(status, _REFUSED_OTHER)] += 1
            slot[_BUCKET + bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds: Prometheus' `le`
            slot[_SUM_NS] += int(seconds * 1e9)

    def signer_failed(self) -> None:
        """A signature that failed (a PKCS#11 token gone): counted under the lock, as observe's are."""
        with self._lock:
            self._slot[_SIGNER_ERRORS] += 1

    def publish(self, store_errors: int, audit_dropped: int, in_flight: int, audit_buffered: int, grant_reads: int) -> None:
        """This worker's counts kept elsewhere, for the scrapes other workers answer."""
        slot, base = self._slot, self._base
        slot[_STORE_ERRORS], slot[_AUDIT_DROPPED], slot[_GRANT_READS] = base[0] + store_errors, base[1] + audit_dropped, base[2] + grant_reads
        slot[_IN_FLIGHT], slot[_AUDIT_BUFFERED] = in_flight, audit_buffered

    def tokens(self) -> tuple[int, dict[str, int]]:
        """(minted, refused by reason) over the whole agent, for `agent status`."""
        t = self.table.totals()
        return t[_MINTED], {r: t[_REFUSED + i] for i, r in enumerate(REFUSALS)}

    def render(self, gauges: Mapping[str, float], labelled: Mapping[str, Mapping[str, float]]) -> str:
        """The agent's counters summed over its workers, then this worker's `gauges` and `labelled` ones."""
        t = self.table.totals()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        metric("codestore_agent_tokens_minted_total", "counter", "Tokens minted.", [("", t[_MINTED])])
        metric("codestore_agent_tokens_refused_total", "counter", "Token requests refused, by reason.",
               [(f'{{reason="{r}"}}', t[_REFUSED + i]) for i, r in enumerate(REFUSALS)])
        hist: list[tuple[str, float]] = []
        count = 0
        for i, bound in enumerate(BUCKETS):
            count += t[_BUCKET + i]
            hist.append((f'_bucket{{le="{bound}"}}', count))
        count += t[_BUCKET + len(BUCKETS)]
        hist += [('_bucket{le="+Inf"}', count), ("_sum", t[_SUM_NS] / 1e9), ("_count", count)]
        out.append("# HELP codestore_agent_token_seconds Time the agent took over a token request.")
        out.append("# TYPE codestore_agent_token_seconds histogram")
        out.extend(f"codestore_agent_token_seconds{suffix} {_num(v)}" for suffix, v in hist)
        metric("codestore_agent_signer_errors_total", "counter", "Signatures that failed.", [("", t[_SIGNER_ERRORS])])
        metric("codestore_agent_store_errors_total", "counter", "Store errors.", [("", t[_STORE_ERRORS])])
        metric("codestore_agent_grant_reads_total", "counter",
               "Grants read from the store because this replica's cache did not hold them.", [("", t[_GRANT_READS])])
        metric("codestore_agent_audit_rows_dropped_total", "counter", "Audit rows dropped.", [("", t[_AUDIT_DROPPED])])
        metric("codestore_agent_requests_in_flight", "gauge", "Requests in flight.", [("", t[_IN_FLIGHT])])
        metric("codestore_agent_audit_rows_buffered", "gauge", "Audit rows buffered.", [("", t[_AUDIT_BUFFERED])])
        metric("codestore_agent_workers", "gauge", "Agent processes serving.", [("", self.table.workers)])
        metric("codestore_agent_worker_restarts_total", "counter", "Workers started again after one died.", [("", t[_RESTARTS])])
        for name, samples in labelled.items():
            label = "state" if name == "grants" else "what"
            metric(f"codestore_agent_{name}", "gauge", name.capitalize() + ".", [(f'{{{label}="{k}"}}', v) for k, v in samples.items()])
        for name, value in gauges.items():
            metric(f"codestore_agent_{name}", "gauge", name.replace("_", " ").capitalize() + ".", [("", value)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


Health = Callable[[], "tuple[bool, str]"]
