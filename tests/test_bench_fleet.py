"""bench/fleet.py's measuring machinery: open-loop schedules, the stall metric, coordinated omission.

Speed is never asserted here (it is measured in bench/); these tests check that the
benchmark measures what it says, against a real Unix-socket server in a subprocess whose
delays the test chooses. Every bound below is one that a slower machine only makes easier.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import OrgKey

BENCH = Path(__file__).resolve().parent.parent / "bench"

# A server that answers every connection "200", one at a time: after `delay` seconds each,
# and once, `stall` seconds before answering the first connection that comes `stall_at`
# seconds or more after its first.
SERVER = r"""
import socket, sys, time
path, delay, stall, stall_at = sys.argv[1], *map(float, sys.argv[2:])
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1024)
print("ready", flush=True)
first = None
while True:
    c, _ = srv.accept()
    c.recv(65536)
    now = time.monotonic()
    first = first or now
    if stall and now - first >= stall_at:
        time.sleep(stall)
        stall = 0
    time.sleep(delay)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    c.close()
"""


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("fleet")


Serve = Callable[..., tuple[str, int]]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    procs: list[subprocess.Popen[str]] = []

    def start(delay: float = 0.0, stall: float = 0.0, stall_at: float = 0.0) -> tuple[str, int]:
        path = str(tmp_path / f"s{len(procs)}.sock")
        proc = subprocess.Popen([sys.executable, "-c", SERVER, path, str(delay), str(stall), str(stall_at)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return path, proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_poisson_schedules_of_all_processes_offer_the_rate_together(fleet: ModuleType) -> None:
    plan = fleet.schedules(2000.0, 100.0, 5.0, "poisson", processes=2)
    times = sorted(t for p in plan for t in p)
    assert len(plan) == 2 and all(p == sorted(p) for p in plan)
    assert 100.0 < times[0] and times[-1] < 105.0
    assert abs(len(times) - 10_000) < 400  # four standard deviations of a Poisson count
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Poisson arrivals come in bursts: some gaps far shorter, some far longer than the mean.
    assert min(gaps) < 0.0005 / 20 and max(gaps) > 0.0005 * 5


def test_fixed_schedules_interleave_the_processes_evenly(fleet: ModuleType) -> None:
    plan = fleet.schedules(1000.0, 10.0, 1.0, "fixed", processes=2)
    assert [len(p) for p in plan] == [500, 500]
    merged = sorted(t for p in plan for t in p)
    assert merged[:3] == pytest.approx([10.0, 10.001, 10.002])
    assert max(b - a for a, b in itertools.pairwise(merged)) == pytest.approx(0.001)


def test_a_closed_loops_stall_is_the_longest_gap_between_answers(fleet: ModuleType) -> None:
    # Requests always waiting (each sent when the last was answered): every gap is a stall.
    answered = [0.01, 0.02, 0.09, 0.10, 0.12]
    requests = [(0.0, a) for a in answered]
    assert fleet.longest_stall(requests, 0.0, 0.13) == pytest.approx(0.07)


def test_idle_time_between_arrivals_is_not_a_stall(fleet: ModuleType) -> None:
    # Two requests 0.5 s apart, each answered in 1 ms: nothing waited in the gap.
    requests = [(0.1, 0.101), (0.6, 0.601)]
    assert fleet.longest_stall(requests, 0.0, 1.0) == pytest.approx(0.001)


def test_a_stall_counts_from_the_earliest_waiting_request(fleet: ModuleType) -> None:
    # Answered at 0.1; one scheduled at 0.3 is answered at 0.5: it waited 0.2 s with no answer.
    requests = [(0.0, 0.1), (0.3, 0.5), (0.45, 0.51)]
    assert fleet.longest_stall(requests, 0.0, 0.6) == pytest.approx(0.2)


def test_a_request_never_answered_stalls_until_the_end(fleet: ModuleType) -> None:
    requests = [(0.0, 0.1), (0.2, math.inf)]
    assert fleet.longest_stall(requests, 0.0, 1.0) == pytest.approx(0.8)


def test_the_stall_is_placed_where_it_happened(fleet: ModuleType) -> None:
    # Its window is what the host's share of the CPUs is read over (Steal).
    answered = [0.01, 0.02, 0.09, 0.10, 0.12]
    assert fleet.stall_window([(0.0, a) for a in answered], 0.0, 0.13) == pytest.approx((0.02, 0.09))
    assert fleet.stall_window([(0.3, 0.5), (0.45, 0.51), (0.0, 0.1)], 0.0, 0.6) == pytest.approx((0.3, 0.5))
    assert fleet.stall_window([], 0.0, 1.0) == (0.0, 0.0)


def test_the_hosts_share_of_the_cpus_is_read_over_the_samples_around_a_window(fleet: ModuleType) -> None:
    steal = fleet.Steal()
    # (time, steal jiffies, all jiffies): 2 cores, 10 ms a jiffy; the host took 6 of 8 jiffies from 0.02 to 0.06.
    steal.samples = [(0.0, 100, 1000), (0.02, 100, 1004), (0.06, 106, 1012), (0.08, 106, 1016)]
    assert steal.share(0.03, 0.05) == pytest.approx(6 / 8)  # from the sample before to the one after
    tick = os.sysconf("SC_CLK_TCK")
    assert steal.taken(0.03, 0.05) == pytest.approx((6 / tick, 8 / tick))  # CPU seconds: the host's, every core's
    assert steal.share(0.0, 0.08) == pytest.approx(6 / 16)
    assert steal.share(0.05, 0.1) is None  # nothing sampled after it
    # On this machine it reads /proc/stat while it runs, a share between none and all.
    with fleet.Steal() as live:
        time.sleep(0.1)
    assert len(live.samples) >= 5
    share = live.share(live.samples[0][0], live.samples[-1][0])
    assert share is not None and 0.0 <= share <= 1.0


def test_the_open_loop_counts_a_server_stall_in_every_request_it_held_back(fleet: ModuleType, serve: Serve) -> None:
    # Coordinated omission: a closed loop of 8 clients would count a 0.4 s stall in at most
    # 8 requests; at 100 requests/s the stall holds back about 40, and each counts its wait.
    sock, pid = serve(stall=0.4, stall_at=0.3)
    r = fleet.Load(sock, [b"GET / HTTP/1.1\r\n\r\n"], 8, 1.5, pid, offered=100.0)
    assert r.kept_up and r.errors == 0
    assert r.stall >= 0.35 and max(r.lat) >= 0.35
    assert sum(1 for x in r.lat if x >= 0.1) >= 20
    # Most of those never got a connection during the stall: they waited in the load generator,
    # which their time from the actual send would hide.
    assert sum(1 for x, s in zip(r.lat, r.service, strict=True) if x - s >= 0.1) >= 10


def test_an_open_loop_the_server_cannot_keep_up_with_reports_no_percentile(fleet: ModuleType, serve: Serve) -> None:
    sock, pid = serve(delay=0.02)  # at most 50 answers/s
    r = fleet.Load(sock, [b"GET / HTTP/1.1\r\n\r\n"], 8, 1.0, pid, offered=200.0)
    assert not r.kept_up and r.rate < 60 and r.backlog > 100
    table = fleet.Table()
    fleet.open_rows(table, "overloaded", r, "p99 <= 10 ms")
    achieved, latency, stall = (row for row in table.rows if isinstance(row, tuple))
    assert achieved[2].endswith("NOT KEPT UP")
    assert latency[2].startswith("none:") and "ms" not in latency[2]
    assert stall[0].strip() == "overloaded: longest stall"


def test_a_closed_loop_keeps_every_slot_busy_and_times_from_the_send(fleet: ModuleType, serve: Serve) -> None:
    sock, pid = serve(delay=0.005)
    start = time.monotonic() + 0.3
    records, errors, unsent = fleet.generate(sock, [b"GET / HTTP/1.1\r\n\r\n"], 8, start, 1.0)
    assert errors == 0 and unsent == [] and len(records) > 20
    assert all(sched == sent and sent < done for sched, sent, done in records)
    # One serial server: each answer waits for the others in flight, so latencies are several delays.
    assert sorted(done - sent for _, sent, done in records)[len(records) // 2] >= 0.005 * 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_bulk_setup_writes_grants_the_agent_reads_back_whole(fleet: ModuleType, tmp_path: Path, backend: str,
                                                                  request: pytest.FixtureRequest) -> None:
    # The bench's store must be the agent's: every column in its place and type, each grant
    # found by its secret and by the repository index, sequence numbers the poll follows.
    from git_credential_codestore.agent.grants import GrantStore

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    state = str(tmp_path / "state")
    GrantStore(state, url).open().close()
    secrets = fleet.bulk_grants(state, 300, 5, url)
    store = GrantStore(state, url).open()
    try:
        made = store.create(repos=["team/x"], scopes=["git:read"], max_ttl=60)[0]
        assert made.seq == 301  # after the bulk's numbers, not among them
        page, _ = store.page(repo="team/*", limit=1000)  # the filter names a pattern as granted
        assert len(page) == 300 and {g.seq for g in page} == set(range(1, 301))
        for secret in secrets:
            g = store.authenticate(secret)
            assert g is not None and g.state() == "active"
            assert (g.repos, g.scopes, g.max_ttl, g.refs, g.ephemeral_only, g.uses) == (("team/*",), ("git:read",), 900, (), False, 0)
    finally:
        store.close()


def test_the_warm_up_lasts_until_no_agent_process_reads_a_grant(fleet: ModuleType, tmp_path: Path, org_key: OrgKey,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The loads measure the steady state: each worker reads a grant from the store on its
    # first use only. A fixed 2 s warm-up left PostgreSQL's cold reads in the measured load.
    from tests.test_agent import start_agent
    from tests.test_agent_store import create

    a = start_agent(tmp_path)
    made = [create(a) for _ in range(20)]
    a.stop()
    a = start_agent(tmp_path, "--workers", "2")  # the same store, two cold caches
    try:
        monkeypatch.setattr(fleet, "WARM_UP", 0.5)
        requests = [fleet.token_request(str(g["grant"]), "team/app") for g in made]
        assert fleet.grant_reads(a.socket) == 0
        fleet.warm_up(a.socket, requests, 8)
        reads = fleet.grant_reads(a.socket)
        assert 20 <= reads <= 40  # each grant by one worker at least, by each at most once
        fleet.generate(a.socket, requests, 8, time.monotonic() + 0.3, 1.0)
        assert fleet.grant_reads(a.socket) == reads
    finally:
        a.stop()


def test_the_tls_section_measures_tokens_answered_over_full_handshakes(fleet: ModuleType, tmp_path: Path, org_key: OrgKey) -> None:
    from tests.test_agent import start_agent, tls_pair
    from tests.test_agent_store import create

    cert, key = tls_pair(tmp_path)
    a = start_agent(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        g = create(a)
        requests = [fleet.token_request(str(g["grant"]), "team/app")]
        address = ("localhost", int(a.url.rsplit(":", 1)[1]))
        rate, agent_us, client_us, errors, kinds = fleet.tcp_load(address, str(cert), requests, 4, 1.0, a.proc.pid)
        assert rate > 0 and errors == 0 and kinds == {} and agent_us > 0 and client_us > 0
        _, _, _, errors, kinds = fleet.tcp_load(address, None, requests, 2, 0.5, a.proc.pid)  # cleartext to a TLS port: every one fails
        assert errors > 0 and sum(kinds.values()) == errors, kinds  # and each failure is named by its kind
    finally:
        a.stop()


def _bench_stores(fleet: ModuleType, tmp_path: Path, grants: dict[str, int]) -> tuple[Path, dict[str, str], tuple[tuple[None, list[bytes]], ...]]:
    """The bench's home, environment and SQLite stores (`ratio_round`'s), each with its
    number of grants, and a token request for each grant, for repository team/<store>."""
    from git_credential_codestore.agent.client import Endpoint, call

    home = tmp_path / "bench"
    home.mkdir()
    env = fleet.environment(str(home))
    stores = []
    for name, n in grants.items():
        proc, sock, _ = fleet.start_agent(env, name)
        try:
            made = [str(call(Endpoint("unix", sock), "POST", "/v1/grants", {"repos": ["team/*"]}, env=env)[1]["grant"])
                    for _ in range(n)]
        finally:
            fleet.stop(proc)
        stores.append((None, [fleet.token_request(g, f"team/{name}") for g in made]))
    return home, env, tuple(stores)


def test_each_ratio_round_runs_its_loads_on_agents_started_for_it_in_alternating_order(
        fleet: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two agents of the same code differ in speed by a few percent, as much as the ratios
    # measure: each round's agents are new processes, every other round runs its loads the
    # other way round (its rates still given in one order), and each load is measured in
    # the middle of a steady one (after a lead-in of itself).
    _, env, stores = _bench_stores(fleet, tmp_path, {"small": 2, "big": 12})
    monkeypatch.setattr(fleet, "WARM_UP", 0.2)
    monkeypatch.setattr(fleet, "WARM_UP_ROUND", 0.1)
    monkeypatch.setattr(fleet, "LEAD_IN", 0.15)
    ran: list[tuple[int, int, float]] = []
    led: list[tuple[str, int]] = []  # the lead-ins and the measured loads, in order
    generate = fleet.generate

    def recorded(sock: str, requests: list[bytes], clients: int, start: float, seconds: float, *rest: object) -> object:
        if seconds == 0.15:
            led.append(("lead-in", len(requests)))
        return generate(sock, requests, clients, start, seconds, *rest)

    class Recorded(fleet.Load):  # type: ignore[name-defined]
        def __init__(self, sock: str, requests: list[bytes], clients: int, seconds: float, pid: int) -> None:
            super().__init__(sock, requests, clients, seconds, pid)
            ran.append((pid, len(requests), self.rate))
            led.append(("load", len(requests)))

    monkeypatch.setattr(fleet, "generate", recorded)
    monkeypatch.setattr(fleet, "Load", Recorded)
    forward = fleet.ratio_round(env, (), stores, 4, 0.3, reverse=False)
    first, ran[:] = list(ran), []
    backward = fleet.ratio_round(env, (), stores, 4, 0.3, reverse=True)
    # the small store's grants; 10 of the big store's; all of them
    assert [n for _, n, _ in first] == [2, 10, 12] and [n for _, n, _ in ran] == [12, 10, 2]
    assert forward == tuple(r for *_, r in first) and backward == tuple(r for *_, r in reversed(ran))
    assert all(r > 0 for r in forward + backward)
    # each measured load follows a lead-in of the same load
    assert led == [(kind, n) for n in (2, 10, 12, 12, 10, 2) for kind in ("lead-in", "load")]
    small, big = first[0][0], first[1][0]
    assert small != big and first[2][0] == big and ran[1][0] == ran[0][0] != ran[2][0]
    assert not {small, big} & {pid for pid, *_ in ran}  # new processes: the first round's are gone
    for pid in {small, big, *(pid for pid, *_ in ran)}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_growing_the_stores_leaves_each_its_own_audit_trail(fleet: ModuleType, tmp_path: Path) -> None:
    # --grow: the ratios on stores that have served for a while (their span indexes spread).
    import sqlite3

    home, env, stores = _bench_stores(fleet, tmp_path, {"small": 1, "big": 1})

    def minted(name: str) -> int:
        with contextlib.closing(sqlite3.connect(home / f"state-{name}" / "agent.sqlite3")) as db:
            return int(db.execute("SELECT count(*) FROM audit WHERE event = 'mint' AND repo = ?", (f"team/{name}",)).fetchone()[0])

    assert minted("small") == minted("big") == 0
    fleet.grow(env, (), stores, 4, 0.5)
    assert minted("small") > 20 and minted("big") > 20  # each store served its own load, flushed at the agent's stop
