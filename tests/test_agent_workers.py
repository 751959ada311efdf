"""`codestore agent serve --workers N`: several agent processes on the same sockets and store."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from git_credential_codestore.agent.client import AgentRefused, AgentUnavailable, Endpoint, exchange
from tests.conftest import BIN, OrgKey
from tests.test_agent import REPO, Agent, mint, sandbox_env, start_agent
from tests.test_agent_metrics import parse
from tests.test_agent_store import admin, create


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by whoever adopted it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_share_the_sockets_and_all_refuse_a_revoked_grant_within_a_second(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: a revoked grant that keeps working on the worker that did not revoke it.
    a = start_agent(tmp_path, "--workers", "2")
    try:
        assert "workers=2" in a.lines[-1]
        workers = _workers(a.proc.pid)
        assert len(workers) == 2
        g = create(a)
        for env in (sandbox_env(g["grant"], sock=a.socket), sandbox_env(g["grant"], url=a.url)):
            for _ in range(20):  # new connections, taken by whichever worker accepts first
                assert mint(env).startswith("eyJ")
        env = sandbox_env(g["grant"], sock=a.socket)
        status, _ = admin(a, "POST", f"/v1/grants/{g['id']}/revoke")
        assert status == 200
        revoked_at = time.monotonic()
        refused_in_a_row, minted_after = 0, 0
        while refused_in_a_row < 30:  # every worker, not only the one that revoked
            try:
                mint(env)
            except AgentRefused as e:
                assert "revoked" in str(e)
                refused_in_a_row += 1
            else:
                assert time.monotonic() - revoked_at < 1.0, "a worker still mints a second after the revocation"
                refused_in_a_row, minted_after = 0, minted_after + 1
        minted = [e for e in a.audit() if e["event"] == "mint"]
        assert len(minted) == 40 + minted_after and all(e["grant"] == g["id"] for e in minted)
    finally:
        a.stop()
    assert a.proc.returncode == 0
    assert all(_gone(pid) for pid in workers)


def test_agent_stop_stops_every_worker(tmp_path: Path, org_key: OrgKey) -> None:
    a = start_agent(tmp_path, "--workers", "2")
    workers = _workers(a.proc.pid)
    proc = a.cli("agent", "stop")
    assert proc.returncode == 0, proc.stderr
    assert f"agent stopped (pid {a.proc.pid})" in proc.stdout  # the agent's pid, not the worker's that answered
    assert a.proc.wait(timeout=20) == 0
    assert all(_gone(pid) for pid in workers)


def test_workers_with_an_idle_timeout_are_refused_in_one_line(tmp_path: Path, org_key: OrgKey) -> None:
    proc = subprocess.run(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--state-dir", str(tmp_path / "s"), "--workers", "2",
         "--idle-timeout", "5"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("codestore: ") and proc.stderr.count("\n") == 1
    assert "--idle-timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_a_grants_own_socket_closes_when_any_worker_revokes_it(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: a revoked grant's socket left listening (and its path left behind) because the
    # revocation landed on a worker other than the one serving the socket.
    a = start_agent(tmp_path, "--workers", "2")
    try:
        revoked = []
        for _ in range(6):  # each revoke lands on whichever worker accepts it
            g = create(a, own_socket=True)
            path = str(g["socket"])
            assert os.path.exists(path)
            assert mint(sandbox_env(None, sock=path)).startswith("eyJ")
            assert admin(a, "POST", f"/v1/grants/{g['id']}/revoke")[0] == 200
            revoked.append(path)
        deadline = time.monotonic() + 2.0
        while any(os.path.exists(p) for p in revoked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in revoked if os.path.exists(p)]
    finally:
        a.stop()


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, org_key: OrgKey) -> None:
    # An OOM kill of the parent must not leave orphan workers serving with nobody to stop them.
    a = start_agent(tmp_path, "--workers", "2")
    workers = _workers(a.proc.pid)
    a.proc.kill()
    a.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in workers)


def _until(condition: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _mints(env: dict[str, str]) -> bool:
    try:
        return mint(env).startswith("eyJ")
    except (AgentUnavailable, AgentRefused):
        return False


def test_a_worker_that_dies_is_started_again_and_the_agent_keeps_serving(tmp_path: Path, org_key: OrgKey) -> None:
    # An OOM kill or a crash of one worker costs that worker for a moment, not the agent:
    # the parent starts another in its place, and it takes over the grant sockets it served.
    a = start_agent(tmp_path, "--workers", "2")
    try:
        g = create(a)
        own = create(a, own_socket=True)
        env, own_env = sandbox_env(g["grant"], url=a.url), sandbox_env(None, sock=str(own["socket"]))
        first = _workers(a.proc.pid)
        os.kill(first[0], signal.SIGKILL)
        _until(lambda: len(_workers(a.proc.pid)) == 2 and first[0] not in _workers(a.proc.pid), "no worker took the dead one's place")
        for _ in range(20):  # new connections, to whichever worker accepts
            assert mint(env).startswith("eyJ")
        second = _workers(a.proc.pid)
        for pid in second:  # every worker at once: connections wait in the parent's socket meanwhile
            os.kill(pid, signal.SIGKILL)
        _until(lambda: not set(second) & set(_workers(a.proc.pid)) and len(_workers(a.proc.pid)) == 2, "the workers were not replaced")
        assert mint(env).startswith("eyJ")
        _until(lambda: _mints(own_env), "the grant's own socket was not served again")
        status, text = exchange(Endpoint("http", "127.0.0.1", int(a.url.rsplit(":", 1)[1])), "GET", "/metrics", b"", None)
        assert status == 200
        assert parse(text.decode())["codestore_agent_worker_restarts_total"] == 3
        a.proc.terminate()
        _, err = a.proc.communicate(timeout=30)
    finally:
        a.stop()
    assert a.proc.returncode == 0
    assert err.count("was killed by SIGKILL; starting it again") == 3, err
    assert "Traceback" not in err


class _UnixHTTP(http.client.HTTPConnection):
    """One keep-alive connection to the agent's socket: it stays with the worker that accepted it."""

    auto_open = 0  # a closed connection is an error here, never a silent reconnect to another worker

    def __init__(self, path: str) -> None:
        super().__init__("agent", timeout=10)
        self.unix_path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        self.sock = sock

    def ask(self, method: str, path: str, body: bytes = b"", authorization: str | None = None) -> tuple[int, bytes]:
        self.request(method, path, body, {"Authorization": authorization} if authorization else {})
        reply = self.getresponse()
        return reply.status, reply.read()


def _connections_to_each_worker(a: Agent, n: int) -> list[_UnixHTTP]:
    """Connections until one is held by each of the n workers (told apart by /v1/status)."""
    held: dict[int, _UnixHTTP] = {}
    for _ in range(200):
        conn = _UnixHTTP(a.socket)
        status, body = conn.ask("GET", "/v1/status")
        assert status == 200
        pid = json.loads(body)["worker_pid"]
        if pid in held:
            conn.close()
        else:
            held[pid] = conn
        if len(held) == n:
            return list(held.values())
    raise AssertionError(f"200 connections reached only workers {sorted(held)}")


def test_metrics_and_status_count_the_tokens_of_every_worker_and_never_go_down(tmp_path: Path, org_key: OrgKey) -> None:
    a = start_agent(tmp_path, "--workers", "2")
    conns: list[_UnixHTTP] = []
    try:
        g = create(a)
        grant = f"Grant {g['grant']}"
        conns = _connections_to_each_worker(a, 2)
        env = sandbox_env(g["grant"], url=a.url)
        minted, refused = 0, {"beyond_grant": 0, "unauthenticated": 0, "bad_request": 0}
        last: dict[str, float] = {}
        for round_ in range(4):
            for conn in conns:  # on each worker's own connection
                for _ in range(2):
                    assert conn.ask("POST", "/v1/token", f"repo={REPO}\nscopes=git:read\n".encode(), grant)[0] == 200
                    minted += 1
                assert conn.ask("POST", "/v1/token", b"repo=other/repo\nscopes=git:read\n", grant)[0] == 403
                refused["beyond_grant"] += 1
            assert mint(env).startswith("eyJ")  # and a helper's new connection, to whichever worker
            minted += 1
            assert conns[round_ % 2].ask("POST", "/v1/token", f"repo={REPO}\nscopes=git:read\n".encode(), "Grant cs_grant_0_forged")[0] == 401
            refused["unauthenticated"] += 1
            assert conns[0].ask("POST", "/v1/token", b"no such line\n", grant)[0] == 400
            refused["bad_request"] += 1
            for conn in conns * 2:  # each worker answers the scrape with the agent's totals
                status, text = conn.ask("GET", "/metrics")
                assert status == 200
                m = parse(text.decode())
                assert m["codestore_agent_tokens_minted_total"] == minted
                for reason, n in refused.items():
                    assert m[f'codestore_agent_tokens_refused_total{{reason="{reason}"}}'] == n, reason
                assert m["codestore_agent_token_seconds_count"] == minted + sum(refused.values())
                assert m["codestore_agent_workers"] == 2
                counters = {k: v for k, v in m.items() if k.split("{")[0].endswith(("_total", "_bucket", "_sum", "_count"))}
                assert not [k for k, v in counters.items() if v < last.get(k, 0)], "a counter went down between scrapes"
                last = counters
        s = json.loads(a.cli("agent", "status", "--json").stdout)
        assert (s["pid"], s["workers"], s["mints"], s["refusals"]) == (a.proc.pid, 2, minted, sum(refused.values()))
        said = a.cli("agent", "status").stdout
        assert f"pid {a.proc.pid}, 2 worker processes" in said
        assert f"{minted} minted, {sum(refused.values())} refused (4 bad_request, 8 beyond_grant, 4 unauthenticated)" in said
        assert "since start, summed over the 2 workers" in said
    finally:
        for conn in conns:
            conn.close()
        a.stop()


def test_a_worker_started_again_while_the_database_is_away_serves_refusals_and_recovers(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: both workers killed while PostgreSQL is down, and their replacements either
    # crash-looping (every mint and /readyz hanging until the database is back) or minting
    # from the parent's fork-old view of the grants.
    from tests.realparts import Postgres

    pg = Postgres()  # a server of its own: this test stops it
    pg.start()
    try:
        a = start_agent(tmp_path, "--workers", "2", "--store", pg.url())
        try:
            g = create(a)
            env = sandbox_env(g["grant"], sock=a.socket)
            assert mint(env).startswith("eyJ")
            pg.stop()
            first = _workers(a.proc.pid)
            for pid in first:
                os.kill(pid, signal.SIGKILL)
            _until(lambda: not set(first) & set(_workers(a.proc.pid)) and len(_workers(a.proc.pid)) == 2, "the workers were not replaced")
            status, ready = admin(a, "GET", "/readyz")  # answered at once by a replacement
            assert status == 503 and ready["ready"] is False, ready
            with pytest.raises(AgentRefused) as refused:
                mint(env)
            assert "\n" not in str(refused.value)
            replaced = _workers(a.proc.pid)
            pg.start()
            _until(lambda: _mints(env) and admin(a, "GET", "/readyz")[0] == 200, "the agent did not recover when the database came back")
            assert _workers(a.proc.pid) == replaced  # served all along: no crash and restart meanwhile
            a.proc.terminate()
            _, err = a.proc.communicate(timeout=30)
        finally:
            a.stop()
    finally:
        pg.destroy()
    assert err.count("starting it again") == 2, err  # the two SIGKILLs, nothing more
