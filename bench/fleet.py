"""Benchmark: the agent as a fleet service (issue 9's numbers), ratios against baselines of the same run.

1. Throughput, a closed loop: 64 clients, each sending its next request (a new connection
   per token, as git helpers connect) as soon as the last is answered; tokens/s of one
   replica against raw ES256 signatures/s of the same key in one thread, with 10 and with
   100k grants in the store: 1000 of the 100k in use, and, apart, the same 10 in use as
   in the 10-grant store (what the store's size alone costs). Those ratios come from
   closed loops run in rounds (--rounds, 5), the median of the rounds' ratios, each round
   on agents started for it and in the other order than the round before, each load after
   a lead-in of itself: the machine's speed drifts more over a minute than what they
   measure, and so does one process's speed against another's (ROUNDS). At saturation a closed loop's latency says how fast the
   agent is, not how long a client waits at a load: by Little's law its mean is clients /
   throughput (printed beside it), and a slow reply delays the next send, so a stall is
   counted once, not in every request it held back (coordinated omission).
2. Latency at a load, an open loop (as wrk2 measures): requests sent at a fixed offered
   rate (0.25 and 0.5 of the raw signing rate: issue 9's throughput target and goal, and
   half the closed loop's rate), at most 64 connections in flight; a request that finds
   them all busy waits, and every request is timed from its scheduled send. Arrivals are
   Poisson by default (many independent sandboxes), evenly spaced with --arrivals fixed.
   An agent that answers less than 95% of the offered rate is reported as not keeping
   up, with no percentile (its latency would only measure how long the run was).
   Both loops report the longest stall: the longest time in which requests waited and no
   load generator process got a token (their time.monotonic() is one clock, the
   machine's CLOCK_MONOTONIC), beside the longest single request.
3. `grant create` and `revoke` (admin calls) with 100k grants: median and p99.
4. revocation propagation between two replicas on one PostgreSQL: revoke on A, time
   until B refuses.
5. audit trail propagation on the same pair: a push reported to A, time until
   `codestore audit` asking B lists it (A adds its buffered rows once a second).
6. TLS: the agent's CPU per token when each token is a new TCP connection with a full TLS
   handshake (as a helper in a sandbox reaches a replica over the network: git starts it
   afresh for each operation, so it keeps no TLS session), against the same clients over
   plain TCP. Clients are blocking threads (ssl's handshake in C), so this measures the
   agent's cost per token, for sizing; the load generator is not the bench's epoll loop.

The load runs in 2 client processes (an epoll loop each, a new connection per token) on
this machine, so clients and agent share its cores (a real fleet's clients are elsewhere):
the ratios are a floor. The agent's and the load generator's CPU per token are printed
beside each closed loop, so a reader can see which of the two the cores were spent on.
Everything is printed as one table at the end (progress goes to stderr).

Run: python bench/fleet.py [--seconds 5] [--clients 64] [--workers N] [--rates 0.25,0.5] [--arrivals poisson|fixed]
     [--store sqlite|postgresql] [--rounds 5] [--grow SECONDS] [--no-tls]
     (needs codestore[fleet]; 4. and 5. need PostgreSQL, or --no-postgres)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import heapq
import itertools
import math
import multiprocessing
import os
import random
import re
import resource
import secrets
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchenv import hermetic_env, write_key  # noqa: E402

from git_credential_codestore import keys  # noqa: E402
from git_credential_codestore.agent import wire  # noqa: E402
from git_credential_codestore.agent.client import Endpoint, call, exchange  # noqa: E402
from git_credential_codestore.secrets import Secret  # noqa: E402

# Load generator processes, one per core here. One would keep up and cost the agent's cores
# a little less (paired runs with two workers: 5722-6463 against 5449-5987 tokens/s), but the
# longest stall is when no generator process got a token, and one process descheduled for a
# while (the PostgreSQL server busy on the same cores) read as the agent stalling: 55-68 ms
# in the PostgreSQL loads with 100k grants, against 16-30 ms with two in the same runs.
PROCESSES = 2
# Before the measured loads: every agent process reads a grant from the store on its first
# use (then from its cache, kept fresh by the poll), so with --workers N each of the 1000
# grants of the 100k-grant load is read N times; the measurement is of the steady state.
# At least WARM_UP seconds of load, then rounds of WARM_UP_ROUND until a round reads none
# (codestore_agent_grant_reads_total): on PostgreSQL with two workers, 2 s was not enough,
# and the cold reads (a round trip each, on the handler threads) were measured as the
# "100k grants" load, at half the 10-grant rate.
WARM_UP, WARM_UP_ROUND, WARM_UP_MAX = 2.0, 0.5, 30.0
# The ratios between closed loops (100k grants against 10): each a median over ROUNDS
# rounds, each round's the ratio of its own loads. On this machine two loads of the same
# agent a minute apart differed by up to 15%; two agents of the same tree and configuration,
# in six alternating rounds each, differed by 8% in one pair and 5% in another (the second
# started slower in one, faster in the other): a process's own luck (its memory layout, its
# hash seed) can be as large as what is measured. So each round starts its agents afresh (on
# the same stores) and the rounds alternate the order of their loads: the median is of
# several processes, and no load always comes first or always follows another's.
# Each load of a round follows LEAD_IN seconds of the same load, unmeasured: what is
# measured is then the middle of one steady load, whose database work left over from the
# moments before (a flush's backlog: about 0.8 s of tokens) is its own, not the load
# before's nor the warm-up's. Without it, the round that began with 1000 grants in use
# (right after the warm-ups) read 0.80-0.81 in two runs, the others 0.88-0.97.
ROUNDS = 5
LEAD_IN = 1.5
# --grow: a store that has served for a while writes more a token than a young one (with
# 1000 grants in use, the span indexes spread over a leaf page a grant until they were keyed
# by bucket first; README). Default 0: the tables are of young stores, and say what grown
# ones read.
GROW_TURN = 15.0
DRAIN = 10.0  # seconds after a load's end in which an answer still counts; later, it is an error
KEPT_UP = 0.95  # an open loop answering less of its offered rate than this did not keep up


def environment(tmp: str) -> dict[str, str]:
    key_path = os.path.join(tmp, "org.pem")
    write_key(key_path)
    os.makedirs(os.path.join(tmp, "run"), mode=0o700)
    return hermetic_env(tmp, os.path.join(tmp, "gitconfig"), path=(BIN,), XDG_RUNTIME_DIR=os.path.join(tmp, "run"),
                        CODESTORE_ORG="acme", CODESTORE_PRIVATE_KEY_FILE=key_path, CODESTORE_KID="bench")


def start_agent(env: dict[str, str], name: str, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    base = env["HOME"]
    sock = os.path.join(base, f"s-{name}", "agent.sock")
    proc = subprocess.Popen(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--socket", sock, "--state-dir", os.path.join(base, f"state-{name}"),
         "--listen", "127.0.0.1:0", *extra], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    if not lines[-1].startswith("ready"):
        proc.kill()
        raise SystemExit(f"bench: the agent did not start: {lines}")
    return proc, sock, lines[1].split()[1]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


def signing_rate(env: dict[str, str], seconds: float = 2.0) -> float:
    """Raw ES256 signatures/s of the org's key, one thread: the issue's baseline.

    The bare signature over a token-sized input, not a whole JWT: tokens.mint adds the
    header, the claims' JSON and base64 (about as much again), and dividing by that would
    flatter every ratio.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    with open(env["CODESTORE_PRIVATE_KEY_FILE"]) as f:
        key = keys.parse_private_key(Secret(f.read()), "bench")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ecdsa, data = ec.ECDSA(hashes.SHA256()), b"x" * 300
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        key.sign(data, ecdsa)
        n += 1
    return n / (time.perf_counter() - start)


def token_request(grant: str, repo: str) -> bytes:
    body = f"repo={repo}\nscopes=git:read\nephemeral=0\nnarrow=0\npurpose=bench\n".encode()
    return (f"POST /v1/token HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\nAuthorization: Grant {grant}\r\n\r\n").encode() + body


def schedules(rate: float, start: float, seconds: float, arrivals: str, processes: int = PROCESSES,
              seed: int = 9) -> list[list[float]]:
    """Send times (time.monotonic()) for each generator process: `rate` tokens/s in all over [start, start + seconds).

    poisson (the default): each process an independent Poisson stream of rate / processes, so
    together one Poisson stream of `rate`. A fleet's agent serves many independent sandboxes,
    and many independent request streams together arrive as a Poisson stream, bursts
    included. fixed: evenly spaced, the processes interleaved (wrk2's schedule): no two
    requests ever arrive together, so it shows the best case. Seeded: every run offers the
    same times.
    """
    end = start + seconds
    out = []
    for i in range(processes):
        if arrivals == "fixed":
            k = itertools.count(i, processes)
            times = list(itertools.takewhile(lambda t: t < end, (start + j / rate for j in k)))
        else:
            rng, times, t = random.Random(seed + i), [], start
            while (t := t + rng.expovariate(rate / processes)) < end:
                times.append(t)
        out.append(times)
    return out


def _generate(sock_path: str, requests: list[bytes], slots: int, start: float, end: float,
              schedule: list[float] | None, out: multiprocessing.Queue) -> None:
    """One load generator process: at most `slots` connections at once, a fresh one per token, on one epoll loop.

    Closed loop (`schedule` None): each slot sends its next request as soon as the last is
    answered, until `end`; a request is timed from its send. Open loop: each request is
    sent at its time in `schedule`, or when a slot frees if all are busy, and is timed from
    its scheduled time: a slow reply that holds back the next sends is counted in their
    latency (no coordinated omission). At `end` the open loop stops sending; requests
    still waiting for a slot are `unsent`. Answers later than DRAIN after `end` are errors,
    so a hung agent cannot hang the benchmark.

    Puts (records, errors, unsent send times, late start): a record (scheduled, sent, answered) in
    time.monotonic(), which is CLOCK_MONOTONIC, one clock for every process of the
    machine, per token answered 200.

    The load generator shares the machine's cores with the agent, so its own CPU per
    request is taken from the agent: non-blocking sockets, pre-built requests and a bare
    epoll loop (no threads, no HTTP library) keep it to a few system calls per token.
    """
    # No cyclic collector here: what this loop makes (sockets, records of three floats) holds
    # no cycles, and a full collection walked the heap forked from the bench process (every
    # module it imported), copying its pages as it went. Both generator processes reached one
    # at the same moment (they allocate alike) and took both cores for 40-46 ms, and the loads
    # read it as the agent stalling (perf record -a during a closed loop's longest stall).
    gc.disable()
    ep = select.epoll()
    conns: dict[int, tuple[socket.socket, float, float, list[bytes]]] = {}
    records: list[tuple[float, float, float]] = []
    errors = 0
    first_error = ""
    n = 0
    due = collections.deque(schedule or ())

    def send(scheduled: float, now: float) -> None:
        nonlocal n, errors, first_error
        req = requests[n % len(requests)]
        n += 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            s.connect(sock_path)
            s.send(req)  # a few hundred bytes: always fits the socket's buffer
        except OSError as e:
            errors += 1
            first_error = first_error or f"connect: {e}"
            s.close()
            return
        conns[s.fileno()] = (s, scheduled, now, [])
        ep.register(s.fileno(), select.EPOLLIN)

    time.sleep(max(0.0, start - time.monotonic()))
    late = time.monotonic() - start
    if schedule is None:
        for _ in range(slots):
            now = time.monotonic()
            send(now, now)
    deadline = end + DRAIN
    while True:
        now = time.monotonic()
        if schedule is not None and now < end:
            while due and due[0] <= now and len(conns) < slots:
                send(due.popleft(), now)
        if not conns and (schedule is None or now >= end or not due):
            break
        if now >= deadline:
            errors += len(conns)
            first_error = first_error or f"no answer {DRAIN:.0f} s after the load's end"
            for s, *_ in conns.values():
                s.close()
            break
        timeout = min(1.0, deadline - now)
        if schedule is not None and now < end and due and len(conns) < slots:
            timeout = min(timeout, due[0] - now)  # epoll waits whole milliseconds, rounded up
        for fd, _ev in ep.poll(max(0.0, timeout)):
            s, scheduled, sent, chunks = conns[fd]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
                chunks.clear()
            if chunk:
                chunks.append(chunk)
                if not _whole(chunks):
                    continue
            done = time.monotonic()
            del conns[fd]
            s.close()  # which takes it out of the epoll set: a system call less than unregister
            if chunks and chunks[0].startswith(b"HTTP/1.1 200"):
                records.append((scheduled, sent, done))
            else:
                errors += 1
                first_error = first_error or repr(b"".join(chunks)[-200:])
            if schedule is None and done < end:
                send(done, done)
    if first_error:
        print(f"   (load generator: {errors} errors, the first: {first_error})", file=sys.stderr)
    out.put((records, errors, list(due), late))


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def _whole(chunks: list[bytes]) -> bool:
    """Whether `chunks` hold a whole reply (its head and Content-Length bytes of body): the
    client is done without waiting to read the agent's close, a wake-up and a read less."""
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    length = _LENGTH.search(head) if sep else None
    return length is not None and len(body) >= int(length.group(1))


def generate(sock: str, requests: list[bytes], clients: int, start: float, seconds: float,
             plan: list[list[float]] | None = None) -> tuple[list[tuple[float, float, float]], int, list[float]]:
    """Run the load in PROCESSES generator processes (`clients` connections at most, in all); see _generate."""
    q: multiprocessing.Queue = multiprocessing.Queue()
    per = max(1, clients // PROCESSES)
    procs = [multiprocessing.Process(target=_generate, args=(sock, requests[i::PROCESSES] or requests, per, start,
                                                             start + seconds, plan[i] if plan else None, q))
             for i in range(PROCESSES)]
    for p in procs:
        p.start()
    records: list[tuple[float, float, float]] = []
    errors = 0
    unsent: list[float] = []
    for _ in procs:
        part, bad, left, late = q.get()
        records += part
        errors += bad
        unsent += left
        if late > 0.05:
            print(f"   (a load generator process started {late * 1000:.0f} ms late: its first requests count as late)",
                  file=sys.stderr)
    for p in procs:
        p.join()
    return records, errors, unsent


def longest_stall(requests: list[tuple[float, float]], start: float, end: float) -> float:
    """The longest time within [start, end] in which a request waited and no token was answered, by any process
    (stall_window's length)."""
    since, until = stall_window(requests, start, end)
    return until - since


def stall_window(requests: list[tuple[float, float]], start: float, end: float) -> tuple[float, float]:
    """Where longest_stall is: (its beginning, its end); (start, start) if no request ever waited.

    `requests` are (scheduled, answered) times, answered inf for a request never answered.
    A closed loop always has requests waiting, so there this is the longest gap between
    answers; in an open loop, the idle time between arrivals is not a stall.
    """
    answered = sorted(done for _, done in requests if start <= done <= end)
    by_schedule = sorted(requests)
    waiting: list[tuple[float, float]] = []  # a heap: the earliest scheduled first
    i, longest, previous = 0, (start, start), start
    for t in [*answered, end]:
        while i < len(by_schedule) and by_schedule[i][0] < t:
            heapq.heappush(waiting, by_schedule[i])
            i += 1
        while waiting and waiting[0][1] < t:  # answered before t
            heapq.heappop(waiting)
        if waiting:
            since = max(previous, waiting[0][0])
            if t - since > longest[1] - longest[0]:
                longest = (since, t)
        previous = t
    return longest


class Steal:
    """The hypervisor's share of this machine's CPU time (/proc/stat's `steal`), sampled
    every SAMPLE seconds while a load runs: on a virtual machine the host can take every
    core at once, and then nothing runs, the agent included. In the loads' stalls of 30-75
    ms, the host took half to three quarters of both cores' time (Dec 1, schedstat of every
    thread and /proc/stat read every few ms: the agent's threads neither ran nor waited to
    run for most of it). Linux counts it in jiffies (10 ms), so a short window reads coarsely.
    """

    SAMPLE = 0.01

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (time.monotonic(), steal jiffies, all jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        return (fields[7], sum(fields)) if len(fields) == 8 else None

    def _run(self) -> None:
        while not self._stop.is_set():
            now, read = time.monotonic(), self._read()
            if read is None:
                return  # not Linux, or no /proc: nothing to say
            self.samples.append((now, *read))
            self._stop.wait(self.SAMPLE)

    def __enter__(self) -> Steal:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, since: float, until: float) -> float | None:
        """The host's share of all CPU time from the last sample at or before `since` to the
        first at or after `until`; None without samples around them."""
        taken = self.taken(since, until)
        return taken[0] / taken[1] if taken else None

    def taken(self, since: float, until: float) -> tuple[float, float] | None:
        """(CPU seconds the host took, all CPU seconds, every core's) from the last sample at or
        before `since` to the first at or after `until`; None without samples around them."""
        before = [x for x in self.samples if x[0] <= since]
        after = [x for x in self.samples if x[0] >= until]
        if not before or not after or after[0][2] == before[-1][2]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return (after[0][1] - before[-1][1]) / tick, (after[0][2] - before[-1][2]) / tick


def metric(sock: str, name: str) -> int:
    """One of the agent's /metrics values without labels (summed over its processes)."""
    status, text = exchange(Endpoint("unix", sock), "GET", "/metrics", b"", None)
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise SystemExit(f"bench: the agent's /metrics (status {status}) has no {name}")


def grant_reads(sock: str) -> int:
    """The agent's codestore_agent_grant_reads_total (all its processes)."""
    return metric(sock, "codestore_agent_grant_reads_total")


def warm_up(sock: str, requests: list[bytes], clients: int) -> None:
    """Load until no agent process reads a grant from the store any more (see WARM_UP)."""
    generate(sock, requests, clients, time.monotonic() + 0.3, WARM_UP)
    reads, deadline = grant_reads(sock), time.monotonic() + WARM_UP_MAX
    while time.monotonic() < deadline:
        generate(sock, requests, clients, time.monotonic() + 0.3, WARM_UP_ROUND)
        now = grant_reads(sock)
        if now == reads:
            return
        reads = now
    progress(f"the agent still read grants from its store after {WARM_UP_MAX:g} s of warm-up; measuring anyway")


def agent_cpu(pid: int) -> float:
    """CPU seconds of the agent: its process and its workers' (Linux /proc)."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Load:
    """One load's outcome: rate, latencies, the longest stall, errors, and CPU per token on each side.

    `offered` None: the closed loop (`clients` clients, each sending when answered); its
    rate is every token answered / seconds, as issue 9's throughput is measured. Otherwise
    an open loop at `offered` tokens/s (see schedules and _generate); its rate is the tokens
    answered within the window / seconds, and `kept_up` says whether that reached KEPT_UP of
    what was offered. Latencies are from the scheduled send, `service` from the actual one.
    """

    def __init__(self, sock: str, requests: list[bytes], clients: int, seconds: float, agent_pid: int,
                 offered: float | None = None, arrivals: str = "poisson") -> None:
        self.clients, self.seconds, self.offered = clients, seconds, offered
        start = time.monotonic() + 0.3  # the generator processes start meanwhile
        plan = schedules(offered, start, seconds, arrivals) if offered else None
        self.scheduled = sum(len(p) for p in plan) if plan else 0
        a0, c0 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        with Steal() as steal:
            records, self.errors, self.unsent = generate(sock, requests, clients, start, seconds, plan)
        a1, c1 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        end = start + seconds
        self.lat = [done - sched for sched, _, done in records]
        self.service = [done - sent for _, sent, done in records]
        in_window = sum(1 for *_, done in records if done <= end)
        self.rate = (in_window if plan else len(records)) / seconds
        self.kept_up = not plan or in_window >= KEPT_UP * self.scheduled
        self.backlog = self.scheduled - in_window  # open loop: offered in the window, not answered in it
        since, until = stall_window([(sched, done) for sched, _, done in records] + [(t, math.inf) for t in self.unsent],
                                    start, end)
        self.stall = until - since
        self.stall_steal = steal.taken(since, until)  # what the host took of the CPUs around the longest stall
        self.steal = steal.share(start, end)  # and over the whole load
        n = max(1, len(records))
        self.audit_waiting: int | None = None  # read_audit
        self.audit_dropped: int | None = None
        self.agent_us = (a1 - a0) / n * 1e6
        self.client_us = ((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)) / n * 1e6

    def percentiles(self) -> str:
        return f"{ms(pct(self.lat, 50))} / {ms(pct(self.lat, 99))} / {ms(max(self.lat, default=0))} ms"

    def stall_text(self) -> str:
        """The longest stall, and what the host took of the CPUs around it (in jiffies: the
        samples around the stall span more than it) and over the load (Steal), when it took any."""
        text = f"{ms(self.stall)} ms"
        if self.stall_steal and self.stall_steal[0]:
            took, cpus = self.stall_steal
            text += f" (the host took {ms(took)} ms of the CPUs' {ms(cpus)} around it; {self.steal or 0:.1%} over the load)"
        return text

    def read_audit(self, sock: str) -> Load:
        """The agent's audit rows not yet in its database right after the load (work left for
        after it, which the CPU per token leaves out) and those it has dropped (past MAX_BUFFER
        rows waiting, the database misses them; the audit file keeps them)."""
        self.audit_waiting = metric(sock, "codestore_agent_audit_rows_buffered")
        self.audit_dropped = metric(sock, "codestore_agent_audit_rows_dropped_total")
        return self


def bulk_grants(state_dir: str, n: int, known: int, store_url: str | None = None) -> list[str]:
    """Put n grants straight into a stopped agent's store (setup only); returns `known` secrets.

    One transaction of three statements (the store's own `execute_rows`), not three round
    trips a grant: 100k grants on PostgreSQL took five minutes that way."""
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(state_dir, store_url).open()
    out: list[str] = []
    rows: list[tuple[object, ...]] = []
    repos: list[tuple[str, str]] = []
    try:
        with store.db.transaction() as tx:
            now = int(time.time())
            first = int(tx.execute("UPDATE grant_changes SET seq = seq + ? WHERE id = 1 RETURNING seq", (n,))[0][0]) - n + 1  # type: ignore[call-overload]
            for i in range(n):
                gid = secrets.token_hex(6)
                secret = f"{g.SECRET_PREFIX}{gid}_{secrets.token_urlsafe(32)}"
                grant = g.Grant(id=gid, secret_sha256=g._hash(secret), repos=("team/*",), scopes=("git:read",), max_ttl=900,
                                sub=f"bench-{i}", created_at=now, seq=first + i)
                rows.append(g._row(grant))
                repos.append(("team/*", gid))
                if i < known:
                    out.append(secret)
            columns = ", ".join(g._COLUMNS)
            values = ", ".join(f"v.column{k}" for k in range(1, len(g._COLUMNS) + 1))
            tx.execute_rows(f"INSERT INTO grants ({columns}) SELECT {values} FROM {{rows}}", g._TYPES, rows)
            tx.execute_rows("INSERT INTO grant_repos (pattern, grant_id) SELECT v.column1, v.column2 FROM {rows}", ("text", "text"), repos)
    finally:
        store.close()
    return out


def admin_latency(sock: str, env: dict[str, str], n: int = 50) -> tuple[list[float], list[float]]:
    ep = Endpoint("unix", sock)
    creates, revokes = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        status, g = call(ep, "POST", "/v1/grants", {"repos": ["team/x"]}, env=env)
        creates.append(time.perf_counter() - t0)
        assert status == 201, g
        t0 = time.perf_counter()
        status, _ = call(ep, "POST", f"/v1/grants/{g['id']}/revoke", env=env)
        revokes.append(time.perf_counter() - t0)
        assert status == 200
    return creates, revokes


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class Table:
    """The benchmark's one table: what, issue 9's target, what was measured; sections and notes between rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str] | str] = []

    def section(self, text: str) -> None:
        self.rows.append(text)

    def row(self, what: str, target: str, measured: str) -> None:
        self.rows.append(("  " + what, target, measured))

    def note(self, text: str) -> None:
        self.rows.append("    " + text)

    def print(self) -> None:
        rows = [("", "target (issue 9)", "measured"), *self.rows]
        w0 = max(len(r[0]) for r in rows if isinstance(r, tuple))
        w1 = max(len(r[1]) for r in rows if isinstance(r, tuple))
        for r in rows:
            print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}".rstrip() if isinstance(r, tuple) else r)


def closed_rows(t: Table, name: str, r: Load, raw: float) -> None:
    t.row(f"{name}: tokens/s / raw signs/s", ">= 0.25 (goal 0.5)", f"{r.rate / raw:.2f} ({r.rate:.0f} tokens/s)")
    t.row(f"{name}: p50 / p99 / longest request", "(set by throughput)", r.percentiles())
    mean = statistics.fmean(r.lat) if r.lat else math.nan
    t.note(f"Little's law: mean latency = {r.clients} clients / {r.rate:.0f} tokens/s = "
           f"{ms(r.clients / r.rate if r.rate else math.inf)} ms; measured mean {ms(mean)} ms")
    t.row(f"{name}: longest stall", "<= 50 ms", r.stall_text())
    t.row(f"{name}: CPU per token, agent / load generator", "", f"{r.agent_us:.0f} / {r.client_us:.0f} us; errors {r.errors}")
    if r.audit_waiting is not None:
        t.row(f"{name}: audit rows not yet in the database at the end; dropped by it so far", "(none dropped)",
              f"{r.audit_waiting} ({r.audit_waiting / max(r.rate, 1):.1f} s of tokens); {r.audit_dropped}")


def open_rows(t: Table, name: str, r: Load, target: str) -> None:
    assert r.offered is not None
    achieved = f"{r.rate:.0f} tokens/s ({r.rate / r.offered:.2f} of offered); errors {r.errors}"
    if r.kept_up:
        t.row(f"{name}: achieved rate", f"{r.offered:.0f}/s", achieved)
        t.row(f"{name}: p50 / p99 / longest", target, f"{r.percentiles()}; p99 from the actual send {ms(pct(r.service, 99))} ms")
    else:
        t.row(f"{name}: achieved rate", f"{r.offered:.0f}/s", f"{achieved}: NOT KEPT UP")
        t.row(f"{name}: p50 / p99 / longest", target,
              f"none: {r.backlog} requests still waited at the end: latency grows with the run's length")
    t.row(f"{name}: longest stall", "<= 50 ms", r.stall_text())


def _tcp_clients(address: tuple[str, int], ca: str | None, requests: list[bytes], threads: int, start: float, end: float,
                 out: multiprocessing.Queue) -> None:
    """One process of the TLS section's load: `threads` blocking clients, each a new connection
    (and, with `ca`, a full TLS handshake verifying the agent's certificate) per token."""
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    counts = [0, 0]  # answered 200, errors
    kinds: collections.Counter[str] = collections.Counter()  # errors by kind: an exception's type, or the status line
    lock = threading.Lock()

    def client(i: int) -> None:
        n = i
        while time.monotonic() < end:
            req = requests[n % len(requests)]
            n += threads
            try:
                with socket.create_connection(address, timeout=DRAIN) as raw:
                    s = ctx.wrap_socket(raw, server_hostname=address[0]) if ctx else raw
                    s.sendall(req)
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200")
                kind = "" if ok else (data.split(b"\r\n", 1)[0].decode("ascii", "replace")[:40] or "no answer")
            except OSError as e:
                ok, kind = False, type(e).__name__
            with lock:
                counts[0 if ok else 1] += 1
                if kind:
                    kinds[kind] += 1

    time.sleep(max(0.0, start - time.monotonic()))
    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((*counts, kinds))


def tcp_load(address: tuple[str, int], ca: str | None, requests: list[bytes], clients: int, seconds: float,
             agent_pid: int) -> tuple[float, float, float, int, dict[str, int]]:
    """(tokens/s, agent CPU us per token, load generator CPU us per token, errors, errors by kind)
    of a closed loop over TCP."""
    q: multiprocessing.Queue = multiprocessing.Queue()
    start = time.monotonic() + 0.3
    procs = [multiprocessing.Process(target=_tcp_clients, args=(address, ca, requests, max(1, clients // PROCESSES), start,
                                                                start + seconds, q)) for _ in range(PROCESSES)]
    a0, c0 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    for p in procs:
        p.start()
    answered = errors = 0
    kinds: collections.Counter[str] = collections.Counter()
    for _ in procs:
        ok, bad, some = q.get()
        answered, errors = answered + ok, errors + bad
        kinds.update(some)
    for p in procs:
        p.join()
    a1, c1 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    n = max(1, answered)
    client = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return answered / seconds, (a1 - a0) / n * 1e6, client / n * 1e6, errors, dict(kinds)


def tls_rows(env: dict[str, str], table: Table, tmp: str, serve: tuple[str, ...], clients: int, seconds: float) -> None:
    from git_credential_codestore.devserver.tls import ensure_certificate

    ca, cert, key = ensure_certificate(os.path.join(tmp, "tls"), "127.0.0.1")
    results: dict[str, tuple[float, float, float, int, dict[str, int]]] = {}
    for name, extra, trust in (("plain TCP", (), None), ("TLS", ("--tls-cert", cert, "--tls-key", key), ca)):
        progress(f"a new {name} connection per token")
        proc, sock, url = start_agent(env, f"tcp-{len(results)}", *serve, *extra)
        try:
            grants = [str(call(Endpoint("unix", sock), "POST", "/v1/grants", {"repos": ["team/*"]}, env=env)[1]["grant"])
                      for _ in range(10)]
            reqs = [token_request(g, f"team/r{i}") for i, g in enumerate(grants)]
            host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
            address = (host, int(port))
            tcp_load(address, trust, reqs, clients, WARM_UP, proc.pid)
            results[name] = tcp_load(address, trust, reqs, clients, seconds, proc.pid)
        finally:
            stop(proc)
    table.section(f"over the network: {clients} blocking clients, a new connection per token (TLS: a full handshake, "
                  f"ECDHE P-256, the agent's certificate verified)")
    for name, (rate, agent_us, client_us, errors, kinds) in results.items():
        said = f" ({', '.join(f'{kind} {n}' for kind, n in collections.Counter(kinds).most_common())})" if kinds else ""
        table.row(f"{name}: tokens/s; CPU per token, agent / clients", "(for sizing)",
                  f"{rate:.0f}; {agent_us:.0f} / {client_us:.0f} us; errors {errors}{said}")
    table.row("agent CPU per token, TLS / plain TCP", "", f"{results['TLS'][1] / results['plain TCP'][1]:.1f} x")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=positive, default=5.0, help="the length of each measured load")
    parser.add_argument("--clients", type=int, default=64, help="connections in flight at most (the closed loop's clients)")
    parser.add_argument("--grants", type=int, default=100_000)
    parser.add_argument("--rounds", type=count, default=ROUNDS,
                        help=f"rounds of the closed loops whose throughputs are divided (default {ROUNDS}; see ROUNDS)")
    parser.add_argument("--grow", type=float, default=0.0,
                        help="seconds of load on each store before the ratios' rounds (default 0: young stores; see GROW_TURN)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS section (6.)")
    parser.add_argument("--workers", type=int, default=1, help="agent serve --workers N for the loads")
    parser.add_argument("--rates", type=fractions, default=[0.25, 0.5],
                        help="the open loops' offered rates, as fractions of the run's raw signing rate (default 0.25,0.5)")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                        help="the open loops' send times: Poisson (default) or evenly spaced")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the loads' grant store: the embedded default, or a PostgreSQL server started here (a fleet's)")
    args = parser.parse_args()
    if args.grow < 0:
        parser.error("--grow must be 0 or more seconds")
    table = Table()
    with tempfile.TemporaryDirectory() as tmp, loads_store(args.store) as store_urls:
        env = environment(tmp)
        raw = signing_rate(env)
        table.section(f"bench/fleet.py: one replica ({args.workers} agent process(es), {args.store} store), "
                      f"a new Unix-socket connection per token, "
                      f"at most {args.clients} in flight, from {PROCESSES} load generator process(es) on the agent's machine; "
                      f"{args.seconds:g} s per load")
        table.row("raw ES256 signs/s, one thread of this process, before the loads", "(the baseline)", f"{raw:.0f}")
        table.section(f"closed loop, throughput: {args.clients} clients, each sending its next request when answered; "
                      f"longest stall: the longest time in which requests waited and no process got a token")
        serve: tuple[str, ...] = ("--workers", str(args.workers)) if args.workers > 1 else ()

        def loads(sock: str, reqs: list[bytes], pid: int, name: str) -> tuple[Load, list[tuple[str, str, Load]]]:
            """A warm-up, the closed loop, then the open loops: at each fraction of raw signing (issue 9's
            p99 target holds from 0.25 up, its throughput target), and at half the closed loop's rate."""
            warm_up(sock, reqs, args.clients)
            progress(f"closed loop, {name}")
            closed = Load(sock, reqs, args.clients, args.seconds, pid).read_audit(sock)
            rates = [(f"{f:g} x raw", "p99 <= 10 ms" if f >= 0.25 else "", f * raw) for f in args.rates]
            opened = []
            for label, target, rate in [*rates, ("0.5 x closed loop", "", closed.rate / 2)]:
                progress(f"open loop at {label} = {rate:.0f} tokens/s, {name}")
                r = Load(sock, reqs, args.clients, args.seconds, pid, offered=rate, arrivals=args.arrivals)
                opened.append((f"{label} = {rate:.0f}/s, {name}", target, r))
            return closed, opened

        # 1. one replica, 10 grants (its store kept for the ratios' rounds, below)
        small_url, big_url = next(store_urls), next(store_urls)
        small_proc, small_sock, _ = start_agent(env, "small", *serve, *store_args(small_url))
        try:
            small = [str(call(Endpoint("unix", small_sock), "POST", "/v1/grants", {"repos": ["team/*"]}, env=env)[1]["grant"])
                     for _ in range(10)]
            small_reqs = [token_request(s, f"team/r{i}") for i, s in enumerate(small)]
            small_closed, small_open = loads(small_sock, small_reqs, small_proc.pid, "10 grants")

            # 2./3. 100k grants
            state = os.path.join(tmp, "state-big")
            proc, sock, _ = start_agent(env, "big", *store_args(big_url))
            stop(proc)
            t0 = time.perf_counter()
            known = bulk_grants(state, args.grants, 1000, big_url)
            progress(f"{args.grants} grants written to the store in {time.perf_counter() - t0:.1f} s (setup)")
            big = f"{args.grants} grants"
            proc, sock, _ = start_agent(env, "big", *serve, *store_args(big_url))
            try:
                reqs = [token_request(s, f"team/r{i}") for i, s in enumerate(known)]
                big_closed, big_open = loads(sock, reqs, proc.pid, big)
                progress(f"grant create and revoke, {big}")
                creates, revokes = admin_latency(sock, env)
            finally:
                stop(proc)
        finally:
            stop(small_proc)
        # The ratios (ROUNDS says how they are measured). The store's size alone: 10 of the
        # 100k in use, as many as the 10-grant store has.
        stores = ((small_url, small_reqs), (big_url, reqs))
        if args.grow:
            progress(f"growing both stores: {args.grow:g} s of load each")
            grow(env, serve, stores, args.clients, args.grow)
        rounds: list[tuple[float, float, float]] = []
        for i in range(args.rounds):
            progress(f"closed loops, round {i + 1} of {args.rounds}: 10 grants; {big}, 10 in use; {big} "
                     f"({'in that order' if i % 2 == 0 else 'the other way round'}), on agents started for it")
            rounds.append(ratio_round(env, serve, stores, args.clients, args.seconds, reverse=i % 2 == 1))

        # The machine's speed drifts during a run: sign again, and divide the closed loops by the mean.
        raw_after = signing_rate(env)
        table.row("raw ES256 signs/s again, after the loads (ratios below: the mean of both)", "", f"{raw_after:.0f}")
        raw = (raw + raw_after) / 2
        closed_rows(table, "10 grants", small_closed, raw)
        closed_rows(table, big, big_closed, raw)
        grown = f", both stores grown first by {args.grow:g} s of load each" if args.grow else ""
        table.section(f"closed loops in {args.rounds} rounds (10 grants; {big}, 10 in use; {big}; every other round "
                      f"the other way round), each on agents started for it{grown}: the median of the rounds' ratios, "
                      "then each round's")
        for label, which in ((f"throughput with {big} (1000 in use) / with 10", 2),
                             (f"throughput with {big}, the same 10 in use / with 10 (the store's size alone)", 1)):
            ratios = [r[which] / r[0] for r in rounds]
            table.row(label, ">= 0.9" if which == 2 else "",
                      f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")
        table.row("tokens/s in the rounds: 10 grants; 10 of 100k in use; 1000 in use", "",
                  "; ".join(", ".join(f"{r[k]:.0f}" for r in rounds) for k in range(3)))
        table.section(f"open loop, latency at a load: {args.arrivals} arrivals at a fixed offered rate, each request "
                      f"timed from its scheduled send (waiting for one of the {args.clients} connections counts)")
        for what, target, r in small_open + big_open:
            open_rows(table, what, r, target)
        table.section(f"grant administration with {big}")
        table.row("grant create: median / p99", "<= 20 ms", f"{ms(statistics.median(creates))} / {ms(pct(creates, 99))} ms")
        table.row("grant revoke: median / p99", "<= 20 ms", f"{ms(statistics.median(revokes))} / {ms(pct(revokes, 99))} ms")

        if not args.no_tls:
            tls_rows(env, table, tmp, serve, args.clients, args.seconds)
        if not args.no_postgres:
            propagation(env, table)
    table.print()
    return 0


@contextlib.contextmanager
def agents_on(env: dict[str, str], serve: tuple[str, ...],
              stores: tuple[tuple[str | None, list[bytes]], ...]) -> Iterator[list[tuple[subprocess.Popen[str], str, list[bytes]]]]:
    """An agent started on each of `ratio_round`'s stores (the 10-grant one's, the 100k-grant
    one's), as (process, socket, its store's requests); stopped at the block's end."""
    started: list[tuple[subprocess.Popen[str], str, list[bytes]]] = []
    try:
        for name, (url, reqs) in zip(("small", "big"), stores, strict=True):
            proc, sock, _ = start_agent(env, name, *serve, *store_args(url))
            started.append((proc, sock, reqs))
        yield started
    finally:
        for proc, *_ in started:
            stop(proc)


def grow(env: dict[str, str], serve: tuple[str, ...], stores: tuple[tuple[str | None, list[bytes]], ...],
         clients: int, seconds: float) -> None:
    """`seconds` of closed-loop load on each of `ratio_round`'s stores, in loads of at most
    GROW_TURN seconds: the audit trail of a store that has served for a while (see GROW_TURN)."""
    with agents_on(env, serve, stores) as agents:
        for _, sock, reqs in agents:
            left = seconds
            while left > 0:
                generate(sock, reqs, clients, time.monotonic() + 0.3, min(GROW_TURN, left))
                left -= GROW_TURN


def ratio_round(env: dict[str, str], serve: tuple[str, ...], stores: tuple[tuple[str | None, list[bytes]], ...],
                clients: int, seconds: float, reverse: bool) -> tuple[float, float, float]:
    """One round of the ratios' closed loops (see ROUNDS) on agents started for it, one on
    each store (the 10-grant one's, the 100k-grant one's): tokens/s with 10 grants; with the
    same 10 of the 100k in use; with 1000 of them in use (`reverse`: run in the other order)."""
    with agents_on(env, serve, stores) as agents:
        for _, sock, reqs in agents:
            warm_up(sock, reqs, clients)
        (small_proc, small_sock, small_reqs), (proc, sock, reqs) = agents
        loads = [(small_sock, small_reqs, small_proc), (sock, reqs[:10], proc), (sock, reqs, proc)]
        rates = {}
        for i in (range(len(loads) - 1, -1, -1) if reverse else range(len(loads))):
            which, requests, agent = loads[i]
            generate(which, requests, clients, time.monotonic() + 0.3, LEAD_IN)
            rates[i] = Load(which, requests, clients, seconds, agent.pid).rate
        return rates[0], rates[1], rates[2]


@contextlib.contextmanager
def loads_store(kind: str) -> Iterator[Iterator[str | None]]:
    """Store URLs for the loads, one per agent: None (each agent's own SQLite file), or
    fresh databases on one PostgreSQL server started for the run (tests/realparts.py)."""
    if kind == "sqlite":
        yield itertools.repeat(None)
        return
    sys.path.insert(0, ROOT)
    from tests.realparts import Postgres

    with Postgres() as pg:
        yield (pg.create_database() for _ in itertools.count())


def store_args(url: str | None) -> tuple[str, ...]:
    return ("--store", url) if url else ()


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def fractions(text: str) -> list[float]:
    """--rates: comma-separated positive fractions of the raw signing rate."""
    return [positive(f) for f in text.split(",")]


def progress(text: str) -> None:
    print(f"bench/fleet.py: {text}", file=sys.stderr, flush=True)


def propagation(env: dict[str, str], table: Table, rounds: int = 20) -> None:
    sys.path.insert(0, os.path.join(ROOT))
    from tests.realparts import Postgres, raw_exchange

    progress("revocation propagation between two replicas on one PostgreSQL")
    pg = Postgres()
    pg.start()
    try:
        url = pg.create_database()
        a, sock_a, _ = start_agent(env, "pa", "--store", url)
        b, sock_b, _ = start_agent(env, "pb", "--store", url)
        try:
            times = []
            for _ in range(rounds):
                status, g = call(Endpoint("unix", sock_a), "POST", "/v1/grants", {"repos": ["team/*"]}, env=env)
                req = token_request(str(g["grant"]), "team/app")
                assert raw_exchange(sock_b, req).startswith(b"HTTP/1.1 200")
                call(Endpoint("unix", sock_a), "POST", f"/v1/grants/{g['id']}/revoke", env=env)
                t0 = time.perf_counter()
                while raw_exchange(sock_b, req).startswith(b"HTTP/1.1 200"):
                    time.sleep(0.002)
                times.append(time.perf_counter() - t0)
            table.section(f"two replicas on one PostgreSQL, {rounds} rounds")
            table.row("revocation on replica A refused by replica B: median / max", "<= 1 s",
                      f"{statistics.median(times) * 1000:.0f} / {max(times) * 1000:.0f} ms")
            progress("audit propagation between two replicas")
            seen = audit_propagation(sock_a, sock_b, env, rounds)
            table.row("a push reported to A, listed by an audit query on B: median / max", "",
                      f"{statistics.median(seen) * 1000:.0f} / {max(seen) * 1000:.0f} ms")
        finally:
            stop(a)
            stop(b)
    finally:
        pg.destroy()


def audit_propagation(sock_a: str, sock_b: str, env: dict[str, str], rounds: int) -> list[float]:
    """Seconds from a push report acknowledged by A to B's audit query listing it."""
    times = []
    for n in range(rounds):
        sha = f"{n + 1:040x}"
        report = {"event": "push", "repo": "team/app", "ephemeral": True,
                  "refs": [{"ref": "refs/heads/bench", "old": "0" * 40, "new": sha, "result": "ok"}]}
        status, _ = call(Endpoint("unix", sock_a), "POST", "/v1/audit/report", report, env=env)
        assert status == 201
        t0 = time.perf_counter()
        while True:
            status, reply = call(Endpoint("unix", sock_b), "POST", "/v1/audit/query",
                                 {"event": "push", "ref": "bench", "limit": 1}, env=env)
            entries = reply.get("entries")
            if status == 200 and isinstance(entries, list) and entries and entries[-1]["refs"][0]["new"] == sha:
                break
            time.sleep(0.01)
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    raise SystemExit(main())
