"""The agent's HTTP fronts (uvicorn with the fleet extra, stdlib threads without it).

Each test runs against both fronts, through the installed `codestore agent serve`.
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from git_credential_codestore.agent.client import Endpoint, call
from git_credential_codestore.agent.discovery import unix_address
from git_credential_codestore.agent.server import MAX_CONNECTIONS, PER_PEER, Caller, share
from tests.conftest import OrgKey
from tests.realparts import raw_exchange
from tests.test_agent import REPO, Agent, mint, sandbox_env, start_agent, tls_pair, verify
from tests.test_agent_store import admin, create

if TYPE_CHECKING:
    from git_credential_codestore.agent.asgi import AsgiFront

_READ = f"repo={REPO}\nscopes=git:read\n".encode()  # a token request's body, in wire.py's line format

FRONTS = ["uvicorn", "threads"]


def _owner(peer: str) -> Caller:
    """A caller on the owner's socket as the front makes one: this process's uid, named `peer`."""
    return Caller("socket", os.getuid(), peer)


@pytest.mark.parametrize("front", FRONTS)
def test_tls_drippers_from_one_address_cannot_lock_out_grant_holders_and_are_cut(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # Threat (issue 8 item 6): anyone who can reach the TLS port holding every connection
    # with a byte every few seconds, so no sandbox gets a token.
    cert, key = tls_pair(tmp_path)
    a = start_agent(tmp_path, "--server", front, "--tls-cert", str(cert), "--tls-key", str(key), "--request-deadline", "2")
    port = int(a.url.rsplit(":", 1)[1])
    drippers: list[socket.socket] = []
    try:
        g = create(a)
        for _ in range(300):  # more than one address's fair share, and more than the old front's 256 threads
            s = socket.socket()
            s.bind(("127.0.0.2", 0))  # the attacker's address
            s.connect(("127.0.0.1", port))
            s.sendall(b"\x16")  # the first byte of a TLS handshake, and no more
            drippers.append(s)
        t0 = time.monotonic()
        env = sandbox_env(g["grant"], url=a.url.replace("127.0.0.1", "localhost"), CODESTORE_AGENT_CA=str(cert))
        assert mint(env)  # a grant holder from another address is served at once
        # Over its share the attacker's extra connections were closed without a cleartext reply.
        refused = 0
        for s in drippers[PER_PEER:]:
            s.settimeout(5)
            try:
                data = s.recv(100)
            except OSError:
                data = b""
            assert not data.startswith(b"HTTP/"), data
            refused += 1
        # And the ones it kept are cut at the request deadline, TLS handshake or not.
        for s in drippers[:PER_PEER]:
            s.settimeout(10)
            try:
                while s.recv(100):
                    pass
            except OSError:
                pass
        assert time.monotonic() - t0 < 10
        assert refused == 300 - PER_PEER
        assert mint(env)
    finally:
        for s in drippers:
            s.close()
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_health_readiness_and_metrics_are_served(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    a = start_agent(tmp_path, "--server", front)
    try:
        g = create(a)
        env = sandbox_env(g["grant"], url=a.url)
        mint(env)
        with pytest.raises(Exception, match="does not cover"):
            mint(env, repo="other/repo")
        ep = Endpoint("http", "127.0.0.1", int(a.url.rsplit(":", 1)[1]))
        assert call(ep, "GET", "/healthz") == (200, {"ok": True})
        status, ready = call(ep, "GET", "/readyz")
        assert status == 200 and ready["ready"] is True
        from git_credential_codestore.agent.client import exchange

        status, text = exchange(ep, "GET", "/metrics", b"", None)
        metrics = text.decode()
        assert status == 200
        assert "codestore_agent_tokens_minted_total 1\n" in metrics
        assert 'codestore_agent_tokens_refused_total{reason="beyond_grant"} 1\n' in metrics
        assert 'codestore_agent_token_seconds_bucket{le="+Inf"} 2\n' in metrics
        assert 'codestore_agent_grants{state="active"} 1\n' in metrics
        assert "codestore_agent_store_up 1\n" in metrics
        assert str(g["grant"]) not in metrics  # Threat: a scrape target leaking grants
    finally:
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_sigterm_drains_requests_in_flight(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # A rolling restart: a request the agent has accepted gets its whole reply.
    a = start_agent(tmp_path, "--server", front)
    g = create(a)
    body = _READ
    # As helpers ask (client.py): one request a connection, `Connection: close`.
    request = (b"POST /v1/token HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Grant %s\r\nContent-Length: %d\r\n\r\n%s"
               % (str(g["grant"]).encode(), len(body), body))
    partial: list[bytes] = []
    complete = [0]
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(a.socket)
                s.sendall(request)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                continue  # not accepted (the listener closed): a helper tries the next replica
            finally:
                s.close()
            if not out:
                continue
            head, _, content = out.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200") and b"token=eyJ" in content and content.endswith(b"\n"):
                complete[0] += 1
            else:
                partial.append(out[:200])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while complete[0] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        a.stop()
    assert complete[0] >= 20 and partial == []


def test_pipelined_token_requests_on_one_connection_are_answered_in_order(tmp_path: Path, org_key: OrgKey) -> None:
    # The fleet front answers a cached grant's token on its event loop and every other
    # request on a thread: a token request behind a slower admin call on the same
    # keep-alive connection must still get its reply second, and a refused one in place.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        g = create(a)
        mint(sandbox_env(g["grant"], url=a.url))  # the grant is in the cache now

        def token(repo: str) -> bytes:
            body = f"repo={repo}\nscopes=git:read\n".encode()
            return (b"POST /v1/token HTTP/1.1\r\nHost: a\r\nAuthorization: Grant %s\r\nContent-Length: %d\r\n\r\n%s"
                    % (str(g["grant"]).encode(), len(body), body))

        pipeline = (token(REPO) + b"GET /v1/grants?limit=1000 HTTP/1.1\r\nHost: a\r\n\r\n" + token("other/repo")
                    + token(REPO) + b"GET /v1/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(a.socket)
        s.sendall(pipeline)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"200", b"403", b"200", b"200"], out[:400]
        assert out.count(b"token=eyJ") == 2
        assert b'"grants"' in out.split(b"HTTP/1.1 403")[0]  # the admin reply came before the refusal
    finally:
        a.stop()


def token_request(grant: object, repo: str = REPO, close: bool = False) -> bytes:
    body = f"repo={repo}\nscopes=git:read\n".encode()
    return (b"POST /v1/token HTTP/1.1\r\nHost: a\r\nAuthorization: Grant %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (str(grant).encode(), len(body), b"Connection: close\r\n" if close else b"", body))


_PING_CLOSE = b"GET /v1/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def _shapes(grant: object) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Ways a client may send its requests: (the writes, paused between; the replies expected, each
    by its status line and a part of its body)."""
    one, last = token_request(grant), token_request(grant, close=True)
    head = last.index(b"\r\n\r\n") + 4
    token, ping = b"200 OK token=eyJ", b'200 OK {"ok": true'
    return {
        "one-write": ([last], [token]),
        "split-in-the-head": ([last[:25], last[25:]], [token]),
        "split-before-the-body": ([last[:head], last[head:]], [token]),
        "byte-by-byte-head": ([last[i:i + 1] for i in range(40)] + [last[40:]], [token]),
        "two-in-one-write": ([one + last], [token, token]),
        "one-and-a-byte-then-the-rest": ([one + last[:1], last[1:]], [token, token]),
        "keep-alive-then-another": ([one, last], [token, token]),
        "token-then-ping": ([one, _PING_CLOSE], [token, ping]),
        "ping-then-token": ([b"GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n", last], [ping, token]),
        "token-then-garbage": ([one, b"garbage\r\n\r\n"], [token, b"400 Bad Request {"]),
        "refused-repo-then-token": ([token_request(grant, "other/repo"), last], [b"403 Forbidden error=", token]),
        "http-1.0": ([last.replace(b"HTTP/1.1", b"HTTP/1.0").replace(b"Connection: close\r\n", b"")], [token]),
    }


@pytest.mark.parametrize("front", FRONTS)
def test_every_way_of_sending_token_requests_gets_the_same_answers(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # The fleet front answers a token request that arrives whole in one read before uvicorn
    # sees the connection, and hands any other to uvicorn with the bytes it read: whatever
    # the split, pipelining or order on one connection, every request gets its own reply.
    a = start_agent(tmp_path, "--server", front)
    try:
        g = create(a)
        mint(sandbox_env(g["grant"], url=a.url))  # the grant is in the cache: answered at once
        for name, (writes, expected) in _shapes(g["grant"]).items():
            if front == "threads":
                expected = expected[:1]  # it answers one request a connection (and says Connection: close)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(a.socket)
            for piece in writes:
                try:
                    s.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break  # the threads front: closed after its one reply
                time.sleep(0.02)  # its own read on the agent's side
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            s.close()
            replies = [re.sub(rb"\r\n.*?\r\n\r\n", b" ", r, count=1, flags=re.S) for r in re.split(rb"HTTP/1\.[01] ", out)[1:]]
            assert len(replies) == len(expected), (name, out[:600])
            assert [r[:len(e)] for r, e in zip(replies, expected, strict=True)] == expected, (name, out[:600])
    finally:
        a.stop()


def test_a_remembered_token_decision_names_each_caller_and_ends_with_its_grant(tmp_path: Path, org_key: OrgKey) -> None:
    # The agent remembers a grant's decision for a request (claims, audit entry and reply
    # encoded once), keyed by the grant's version and by who asks. Threat: a remembered
    # decision outliving a revocation, or one caller's audit line written in another's name.
    a = start_agent(tmp_path)
    try:
        g = create(a)
        request = token_request(g["grant"], close=True)
        host, port = a.url.removeprefix("http://").rsplit(":", 1)
        peers = ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2"]
        stamps = []
        for peer in peers:
            with socket.create_connection((host, int(port)), timeout=10, source_address=(peer, 0)) as s:
                s.sendall(request)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            assert out.startswith(b"HTTP/1.1 200"), out[:300]
            claims = verify(re.search(rb"token=(\S+)", out).group(1).decode(), org_key)  # type: ignore[union-attr]
            assert claims.exp == claims.iat + 300
            stamps.append(claims.iat)
            time.sleep(1.05 if peer == peers[1] else 0)
        assert stamps[2] > stamps[1]  # each token has its own time, not a remembered one
        minted = [e for e in a.audit() if e["event"] == "mint" and e["grant"] == g["id"]]
        assert [e["peer"] for e in minted][:4] == peers
        assert raw_exchange(a.socket, request).startswith(b"HTTP/1.1 200")  # remembered for this caller too
        assert admin(a, "POST", f"/v1/grants/{g['id']}/revoke")[0] == 200
        assert raw_exchange(a.socket, request).startswith(b"HTTP/1.1 401")
    finally:
        a.stop()


def _decided(agent: object, caller: Caller, authorization: str | None, body: bytes) -> int:
    """The status of one token request through the path every token takes (respond_tokens)."""
    from git_credential_codestore.agent.server import respond_tokens

    return respond_tokens(agent, [(caller, authorization, body)])[0][0]  # type: ignore[arg-type]


def test_a_remembered_decision_is_only_for_the_secret_and_caller_it_was_decided_for(
        tmp_path: Path, in_process: tuple[AsgiFront, str]) -> None:
    # Agent.decide remembers a grant's decision under the request as it came: the
    # Authorization value, the body and who asks. Threat: a remembered decision answering
    # a request it was not made for: another secret claiming the same grant id (never
    # checked against the grant's hash), or another caller written in the audit as the first.
    front, grant = in_process
    agent = front.agent
    body = _READ
    first, second = _owner("uid:1"), _owner("uid:2")
    for _ in range(2):  # decided, then remembered
        assert _decided(agent, first, f"Grant {grant}", body) == 200
    forged = f"Grant {grant.rsplit('_', 1)[0]}_{'A' * 43}"  # the grant's id, another secret
    assert _decided(agent, first, forged, body) == 401
    assert _decided(agent, second, f"Grant {grant}", body) == 200
    assert _decided(agent, first, f"Grant {grant}", body.replace(b"git:read", b"git:write")) == 403  # the grant reads only
    agent.audit.close()
    lines = [json.loads(ln) for ln in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["event"], e["peer"], e["scopes"]) for e in lines if e["event"] in ("mint", "refuse")] == [
        ("mint", "uid:1", ["git:read"]), ("mint", "uid:1", ["git:read"]), ("refuse", "uid:1", ["git:read"]),
        ("mint", "uid:2", ["git:read"]), ("refuse", "uid:1", ["git:write"])]


def test_a_request_decided_before_is_known_at_once_while_its_grant_version_holds(
        in_process: tuple[AsgiFront, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The fleet front asks answers_at_once of every request it has read whole: a request
    # decided before, under a grant version the store still holds, is known without
    # looking the grant up; anything else is looked up as before (a grant changed since, a
    # request never decided), so nothing is answered on the event loop that may wait.
    front, grant = in_process
    agent = front.agent
    caller = _owner("uid:1")
    body = _READ
    assert _decided(agent, caller, f"Grant {grant}", body) == 200

    def looked_up(gid: str) -> None:
        raise LookupError(gid)

    monkeypatch.setattr(agent.store, "cached", looked_up)
    assert agent.answers_at_once(caller, "POST", "/v1/token", f"Grant {grant}", body)
    with pytest.raises(LookupError):  # never decided
        agent.answers_at_once(caller, "POST", "/v1/token", f"Grant {grant}", body + b"ttl=60\n")
    with pytest.raises(LookupError):  # without the body (a request not yet read whole)
        agent.answers_at_once(caller, "POST", "/v1/token", f"Grant {grant}")
    agent.store.replaced += 1  # a cached grant replaced since
    with pytest.raises(LookupError):
        agent.answers_at_once(caller, "POST", "/v1/token", f"Grant {grant}", body)


def test_what_is_remembered_of_token_requests_is_bounded_whatever_is_sent(
        in_process: tuple[AsgiFront, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A decision is remembered under the whole Authorization value, and a grant's secret
    # is still accepted with spaces around it. Threat: one grant holder filling the memo
    # with thousands of distinct values of up to the head's 16 KiB each (64 MiB).
    from git_credential_codestore.agent import server as agent_server

    front, grant = in_process
    agent = front.agent
    caller = _owner("uid:1")
    body = _READ
    monkeypatch.setattr(agent_server, "MEMO_REQUESTS", 8)
    for n in range(20):  # distinct values, each remembered until the memo is full, then it starts again
        assert _decided(agent, caller, f"Grant {' ' * n}{grant}", body) == 200
        assert 1 <= len(agent._decided) <= 8
    padded = f"Grant {grant}{' ' * 16000}"
    held = dict(agent._decided)
    assert _decided(agent, caller, padded, body) == 200  # answered, not remembered
    assert agent._decided == held


def test_a_remembered_decision_ends_with_a_revocation_however_the_replica_learns_of_it(
        tmp_path: Path, in_process: tuple[AsgiFront, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # What is remembered is vouched for by the store's count of cached grants replaced,
    # while it stands still. Threat: a revocation this replica takes in without that count
    # moving, the remembered decision then minting under a revoked grant: one made on
    # another replica (taken in by sync), and one of a grant evicted from the cache
    # meanwhile (taken in as a grant new to the cache, not as a replacement); and a view of
    # the grants gone stale (the store not answering) must refuse as it did before.
    from git_credential_codestore.agent import grants as agent_grants
    from git_credential_codestore.agent.db import DB_FILE
    from git_credential_codestore.agent.grants import GrantStore

    front, grant = in_process
    agent = front.agent
    caller = _owner("uid:1")
    body = _READ
    other = GrantStore(str(tmp_path / "other"), str(tmp_path / "state" / DB_FILE)).open()  # a replica on the same database
    try:
        # Revoked on the other replica, taken in by this one's sync.
        assert _decided(agent, caller, f"Grant {grant}", body) == 200
        assert _decided(agent, caller, f"Grant {grant}", body) == 200
        other.revoke(grant.split("_")[1])
        agent.store.catch_up()
        assert _decided(agent, caller, f"Grant {grant}", body) == 401

        # Evicted from this replica's cache by grants made on the other replica, then revoked
        # there: all three taken in as grants new to the cache, none replacing one.
        monkeypatch.setattr(agent_grants, "CACHE_MAX", 2)
        second = str(agent.create_grant({"repos": [REPO]})[1]["grant"])
        for _ in range(2):
            assert _decided(agent, caller, f"Grant {second}", body) == 200
        for _ in range(2):
            other.create(repos=["other/*"], scopes=["git:read"], max_ttl=300)
        other.revoke(second.split("_")[1])
        agent.store.catch_up()
        assert _decided(agent, caller, f"Grant {second}", body) == 401

        # A view gone stale.
        third = str(agent.create_grant({"repos": [REPO]})[1]["grant"])
        assert _decided(agent, caller, f"Grant {third}", body) == 200
        monkeypatch.setattr(agent.store, "_fresh_until", 0.0)
        assert _decided(agent, caller, f"Grant {third}", body) == 503
    finally:
        other.close()


def test_a_keep_alive_connection_idle_after_a_token_is_closed(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: connections held open after their reply, each counted against the agent's 1024.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        g = create(a)
        mint(sandbox_env(g["grant"], url=a.url))
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(a.socket)
        s.sendall(token_request(g["grant"]))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        t0 = time.monotonic()
        assert s.recv(65536) == b""  # closed by the agent, not by this test's timeout
        assert 3 < time.monotonic() - t0 < 15
        s.close()
    finally:
        a.stop()


def test_a_header_that_never_ends_is_refused_at_the_head_cap(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: one connection sending a header line that never ends. The parser keeps its
    # pieces until the line ends, so the agent held (and copied on every read, on its
    # event loop) whatever the client sent until the request deadline: memory and CPU
    # without bound, from anyone who can connect.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(a.socket)
        s.sendall(b"GET /v1/ping HTTP/1.1\r\nHost: a\r\nX-Long: ")
        sent, chunk = 0, b"a" * 65536
        try:
            while sent < 8 * 1024 * 1024:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the agent stopped reading and closed: what it should do
        reply = b""
        try:
            while part := s.recv(65536):
                reply += part
        except OSError:
            pass
        s.close()
        assert reply.startswith(b"HTTP/1.1 431 "), (sent, reply[:100])
        assert sent < 2 * 1024 * 1024  # refused near the cap, not after megabytes
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200
    finally:
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_one_grant_socket_cannot_take_every_connection_of_the_agent(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # Threat: a sandbox given its grant's own socket (--own-socket, mounted into its
    # container) opening connections until the agent has none left for any other sandbox
    # or for its owner. A grant's socket is one peer, held to its fair share like an address.
    a = start_agent(tmp_path, "--server", front)
    held: list[socket.socket] = []
    try:
        own = create(a, own_socket=True)
        other = create(a)
        with unix_address(str(own["socket"])) as address:  # the grant's socket is deep in the state dir
            for _ in range(MAX_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(address)
                held.append(s)
            # The agent accepts in order: once one more is answered (busy), it has taken them all.
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(10)
                probe.connect(address)
                # The busy answer is sent at accept and the connection closed: it may come
                # before the request is written (EPIPE), and is read all the same.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    probe.sendall(b"GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n")
                assert probe.recv(100).startswith(b"HTTP/1.1 503")
        assert mint(sandbox_env(other["grant"], url=a.url))  # another sandbox is served
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200  # and so is the owner
        busy = 0
        for s in held:
            s.setblocking(False)
            try:
                busy += s.recv(100).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        assert busy >= MAX_CONNECTIONS - PER_PEER
    finally:
        for s in held:
            s.close()
        a.stop()


def test_a_client_that_never_reads_its_replies_is_not_answered_without_bound(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: anyone who can connect pipelining token requests (refused ones will do, no
    # grant needed) and never reading the replies. The token fast path wrote each reply
    # whatever the connection's write buffer held, and kept reading: the agent buffered
    # replies without bound. It must stop reading until the client reads.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(a.socket)
        s.settimeout(3)
        batch = b"POST /v1/token HTTP/1.1\r\nHost: a\r\nAuthorization: Grant x\r\nContent-Length: 0\r\n\r\n" * 1000
        sent = 0
        try:
            while sent < 8 * 1024 * 1024:
                s.sendall(batch)
                sent += len(batch)
        except OSError:
            pass  # the agent stopped reading (a timeout here), or closed past PIPELINED: what it should do
        assert sent < 4 * 1024 * 1024, f"the agent read {sent} bytes of requests whose replies nobody read"
        s.close()
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200
    finally:
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET /v1/ping HTTP/1.1\r\nX-A: " + b"a" * 40000 + b"\r\n\r\n", b"431"),
        (b"GET /v1/ping HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)) + b"\r\n", b"431"),
        (b"GET /v1/ping?" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"414"),
    ],
    ids=["one-long-header", "many-headers", "long-target"],
)
def test_request_heads_are_capped_at_16_kib_on_both_fronts(tmp_path: Path, org_key: OrgKey, front: str, request_: bytes, status: bytes) -> None:
    # Threat: heads of megabytes held per connection. The standard library's parser takes
    # 100 header lines of 64 KiB each (6.5 MB a connection, 1024 connections at once).
    a = start_agent(tmp_path, "--server", front)
    try:
        reply = raw_exchange(a.socket, request_)
        assert reply.split(b" ")[1] == status, reply[:200]
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200
    finally:
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_two_content_lengths_are_refused_on_both_fronts(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # Threat (request smuggling): the threads front read the first of two Content-Lengths
    # where uvicorn refused them; a proxy reading the other would frame the next request
    # differently from the agent.
    a = start_agent(tmp_path, "--server", front)
    try:
        reply = raw_exchange(a.socket, b"POST /v1/grants HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x")
        assert reply.split(b" ")[1] == b"400", reply[:200]
    finally:
        a.stop()


def stopped_log(a: Agent) -> str:
    """Stop the agent; what it wrote to its log (stderr), start to end."""
    a.proc.terminate()
    return a.proc.communicate(timeout=30)[1]


def test_bad_requests_write_nothing_to_the_agents_log(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: anyone who can connect writing a line into the agent's log per request: uvicorn
    # warned "Invalid HTTP request received." (and "Unsupported upgrade request." twice) for
    # each, filling the log, and the disk or journal behind it, at an unauthenticated rate.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        for _ in range(20):
            assert raw_exchange(a.socket, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
            raw_exchange(a.socket, b"GET /v1/ping HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", timeout=5)
    finally:
        err = stopped_log(a)
    assert err.splitlines() == ["codestore agent exiting: stopped"], err[:500]


def test_an_ipv6_peer_is_its_64_and_a_mapped_ipv4_peer_its_address() -> None:
    # Threat: per-peer fairness (PER_PEER of MAX_CONNECTIONS) defeated by one IPv6 host,
    # which holds a /64 and can connect from as many of its addresses as it likes.
    # (Loopback has one IPv6 address, so this is the rule itself, on both fronts' one function.)
    one = share("tcp", ("2001:db8:1:2::1", 40000, 0, 0), None)
    assert one == share("tcp", ("2001:db8:1:2:ffff:ffff:ffff:9", 40001, 0, 0), None) == "2001:db8:1:2::/64"
    assert one != share("tcp", ("2001:db8:1:3::1", 40000, 0, 0), None)
    assert share("tcp", ("fe80::1%eth0", 1, 0, 2), None) == share("tcp", ("fe80::2%eth0", 1, 0, 2), None)
    assert share("tcp", ("::ffff:192.0.2.7", 1, 0, 0), None) == share("tcp", ("192.0.2.7", 1), None) == "192.0.2.7"
    assert share("tcp", ("192.0.2.7", 1), None) != share("tcp", ("192.0.2.8", 1), None)


def test_tls_handshakes_carry_no_session_tickets(tmp_path: Path, org_key: OrgKey) -> None:
    # Helpers are new processes that never resume a TLS session: a ticket is work for nothing
    # on every handshake (bench/fleet.py section 6 measures a handshake per token).
    import ssl

    cert, key = tls_pair(tmp_path)
    a = start_agent(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        port = int(a.url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /v1/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            assert out.startswith(b"HTTP/1.1 200"), out[:200]
            assert s.version() == "TLSv1.3"
            assert s.session is not None and not s.session.has_ticket
    finally:
        a.stop()


@pytest.fixture
def in_process(tmp_path: Path, org_key: OrgKey) -> Iterator[tuple[AsgiFront, object]]:
    """(the fleet front of an agent in this process, a grant secret): for tests that reach
    into the front (AsgiFront._serve) or the handler, which a subprocess would not let them."""
    from git_credential_codestore import config, keys
    from git_credential_codestore.agent.asgi import AsgiFront
    from git_credential_codestore.agent.audit import AuditLog
    from git_credential_codestore.agent.grants import GrantStore
    from git_credential_codestore.agent.server import Agent as AgentCore
    from git_credential_codestore.secrets import Secret

    cfg = config.load()
    store = GrantStore(str(tmp_path / "state")).open()
    audit = AuditLog(str(tmp_path / "audit.log"))
    store.on_flush = audit.flush_into
    store.start()
    agent = AgentCore(cfg, keys.parse_private_key(Secret(org_key.pem), "test"), "file", "kid", store, audit)
    front = AsgiFront(agent)
    try:
        yield front, agent.create_grant({"repos": [REPO]})[1]["grant"]
    finally:
        front.drain(1)
        store.close()
        audit.close()


def _read_all(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    while chunk := s.recv(1 << 20):
        data += chunk
    return data


def _mints(tmp_path: Path) -> int:
    return sum('"event":"mint"' in ln for ln in (tmp_path / "audit.log").read_text().splitlines())


def test_a_reply_the_socket_does_not_take_whole_is_finished_on_the_loop_and_minted_once(
        tmp_path: Path, org_key: OrgKey, in_process: tuple[AsgiFront, object]) -> None:
    # The accept answers a token request on the socket itself; when the socket does not take
    # the reply whole (its buffer full: a client that has not read), the rest must follow,
    # whole, and the request must not be answered (minted) a second time.
    front, grant = in_process
    lst = front.listen_unix(str(tmp_path / "a.sock"))
    ours, client = socket.socketpair()
    client.sendall(token_request(grant, close=True))
    ours.setblocking(False)
    junk = 0
    for size in (65536, 4096, 64, 1):  # fill what the socket holds for a client that does not read
        with pytest.raises(BlockingIOError):
            while True:
                junk += ours.send(b"x" * size)
    conn = _socket.socket(ours.family, ours.type, 0, ours.detach())

    async def serve() -> None:
        front._serve([(conn, None)], lst)

    front._call(serve())
    data = _read_all(client)
    assert data[:junk] == b"x" * junk
    head, _, body = data[junk:].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    assert len(body) == length and b"token=" in body
    verify(body.split(b"token=", 1)[1].split(b"\n", 1)[0].decode(), org_key)
    assert _mints(tmp_path) == 1


def test_connections_accepted_together_are_each_answered_as_if_alone(tmp_path: Path, org_key: OrgKey) -> None:
    # The accept takes the connections that waited together through each step at once
    # (AsgiFront._serve): accepted while the agent was stopped, one that is gone, not whole,
    # not HTTP or not a token request must change nothing for the others, in a group or across.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        grant = create(a)["grant"]
        whole = token_request(grant, close=True)
        kinds = [  # (sent while the agent is stopped, sent after it goes on or None to close, the reply's start)
            (whole, b"", b"HTTP/1.1 200"),
            (b"", None, b""),  # closed before asking anything
            (whole[:30], whole[30:], b"HTTP/1.1 200"),
            (b"garbage\r\n\r\n", b"", b"HTTP/1.1 400"),
            (_PING_CLOSE, b"", b"HTTP/1.1 200"),
            (token_request("nope", close=True), b"", b"HTTP/1.1 401"),
            (token_request(grant, "other/repo", close=True), b"", b"HTTP/1.1 403"),
        ]
        from git_credential_codestore.agent.asgi import ACCEPT_GROUP

        cases = [kinds[i % len(kinds)] for i in range(3 * ACCEPT_GROUP + 5)]  # several groups, and one in part
        clients = []
        a.proc.send_signal(signal.SIGSTOP)
        try:
            for first, rest, _ in cases:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(20)
                s.connect(a.socket)
                s.sendall(first)
                if rest is None:
                    s.close()  # gone before the agent reads it
                clients.append(s)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        for s, (_, rest, expected) in zip(clients, cases, strict=True):
            with s:
                if rest is None:
                    continue
                if rest:
                    s.sendall(rest)
                reply = _read_all(s)
                assert reply.startswith(expected), (expected, reply[:80])
                if b"token=" in reply:
                    verify(reply.split(b"token=", 1)[1].split(b"\n", 1)[0].decode(), org_key)
        tokens = sum(first.startswith(b"POST") and expected == b"HTTP/1.1 200" for first, _, expected in cases)
        assert sum(b'"event":"mint"' in ln for ln in (a.state_dir / "audit.log").read_bytes().splitlines()) == tokens
        assert raw_exchange(a.socket, _PING_CLOSE).startswith(b"HTTP/1.1 200")
    finally:
        a.stop()


def test_a_connection_whose_answer_fails_is_closed_and_the_others_in_its_group_answered(
        tmp_path: Path, org_key: OrgKey, in_process: tuple[AsgiFront, object], monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in answering one connection of a group (here: deciding how to answer one
    # grant's request raises; the handler's own bugs are a 500, server.respond) is reported
    # and closes that connection alone; the others' steps go on.
    front, grant = in_process
    lst = front.listen_unix(str(tmp_path / "a.sock"))
    at_once = front.agent.answers_at_once

    def failing(caller: Caller, method: str, target: str, authorization: str | None, body: bytes | None = None) -> bool:
        if authorization == "Grant boom":
            raise RuntimeError("a bug")
        return at_once(caller, method, target, authorization, body)

    monkeypatch.setattr(front.agent, "answers_at_once", failing)
    reported: list[dict[str, object]] = []
    front.loop.set_exception_handler(lambda loop, context: reported.append(context))
    pairs = [socket.socketpair() for _ in range(3)]
    for (_, client), presented in zip(pairs, [grant, "boom", grant], strict=True):
        client.sendall(token_request(presented, close=True))
    group: list[tuple[_socket.socket, object]] = [(_socket.socket(ours.family, ours.type, 0, ours.detach()), None) for ours, _ in pairs]

    async def serve() -> None:
        front._serve(group, lst)

    front._call(serve())
    replies = [_read_all(client) for _, client in pairs]
    assert replies[0].startswith(b"HTTP/1.1 200") and replies[2].startswith(b"HTTP/1.1 200")
    assert replies[1] == b""
    assert [str(c["exception"]) for c in reported] == ["a bug"]
    assert _mints(tmp_path) == 2
    assert front.slots.total == 0  # every connection's count released


def test_token_requests_answered_together_are_signed_in_a_row_and_each_answered_as_alone(
        tmp_path: Path, org_key: OrgKey, in_process: tuple[AsgiFront, object], monkeypatch: pytest.MonkeyPatch) -> None:
    # respond_tokens (the accept's group) decides each request, signs the tokens one after
    # another, then audits and answers each: a refusal, a bug in one request (a 500) and a
    # signer failing in the row change nothing for the others.
    from git_credential_codestore.agent.server import respond_tokens
    from git_credential_codestore.tokens import SignerUnavailable

    front, grant = in_process
    agent = front.agent
    caller = _owner("uid")
    body = _READ
    events: list[str] = []
    sign, emit, decide = agent.key.sign, agent.audit.emit, agent.decide
    failures = iter([True])  # the row's first signature fails; asked again, the signer signs

    def signing(data: bytes) -> bytes:
        events.append("sign")
        if next(failures, False):
            raise SignerUnavailable("the signer is away")
        return sign(data)

    def emitting(entry: object, stands: bool = False) -> None:
        events.append("audit")
        emit(entry, stands)  # type: ignore[arg-type]

    def deciding(caller: Caller, authorization: str | None, body: bytes) -> object:
        if authorization == "Grant boom":
            raise RuntimeError("a bug")
        return decide(caller, authorization, body)

    monkeypatch.setattr(agent.key, "sign", signing)
    monkeypatch.setattr(agent.audit, "emit", emitting)
    monkeypatch.setattr(agent, "decide", deciding)
    asked = [f"Grant {grant}", "Grant boom", "Grant nope", f"Grant {grant}", None]
    replies = respond_tokens(agent, [(caller, authorization, body) for authorization in asked])
    assert [status for status, _, _ in replies] == [200, 500, 401, 200, 200]
    for status, reply, _ in replies:
        if status == 200:
            verify(reply.split(b"token=", 1)[1].split(b"\n", 1)[0].decode(), org_key)
    # The refusal's line as it is decided; three signatures in a row (the first failed);
    # the failed one asked again as its token is handed out; each token's line as it is.
    assert events == ["audit"] + ["sign"] * 3 + ["sign", "audit", "audit", "audit"], events
    assert _mints(tmp_path) == 3


def test_a_request_refused_for_its_size_is_read_whole_before_the_refusal(tmp_path: Path, org_key: OrgKey) -> None:
    # A request already whole in the socket when the agent accepts it (the agent stopped
    # meanwhile) is read at accept. Read in part, the refusal's close found unread bytes
    # and reset the connection: the client read ECONNRESET instead of its 414.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        request = b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"
        a.proc.send_signal(signal.SIGSTOP)
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(a.socket)
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        with s:
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 414")
        assert raw_exchange(a.socket, _PING_CLOSE).startswith(b"HTTP/1.1 200")  # and it goes on serving
    finally:
        a.stop()


def test_every_front_counts_a_token_requests_outcome_the_same_way_a_bug_included(
        in_process: tuple[AsgiFront, object], monkeypatch: pytest.MonkeyPatch) -> None:
    # The threaded and uvicorn fronts (server.respond) had a token path of their own in
    # Agent.dispatch, which did not count a request whose handling raised; the fleet
    # front's (respond_tokens) counted it as a 500. Every token now goes through one.
    from git_credential_codestore.agent.server import respond, respond_tokens

    front, grant = in_process
    agent = front.agent
    caller = _owner("uid")
    body = _READ
    decide = agent.decide

    def deciding(caller: Caller, authorization: str | None, body: bytes) -> object:
        if authorization == "Grant boom":
            raise RuntimeError("a bug")
        return decide(caller, authorization, body)

    monkeypatch.setattr(agent, "decide", deciding)
    headers = {f"Grant {grant}": "200", "Grant boom": "500", "Grant nope": "401"}
    one_by_one = [respond(agent, caller, "POST", "/v1/token", {"Authorization": h}.get, body)[0] for h in headers]
    together = [status for status, _, _ in respond_tokens(agent, [(caller, h, body) for h in headers])]
    assert one_by_one == together == [200, 500, 401]
    minted, refused = agent.metrics.tokens()
    assert minted == 2 and sum(refused.values()) == 4  # the two 500s and the two 401s, one of each a path
    text = agent.render_metrics()
    assert 'codestore_agent_token_seconds_bucket{le="+Inf"} 6\n' in text


@pytest.mark.parametrize("request_", [
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",  # no grant needed: anyone who can connect
    b"POST /v1/token HTTP/1.1\r\nHost: a\r\nAuthorization: Grant x\r\nContent-Length: 0\r\n\r\n",
], ids=["healthz", "token"])
def test_pipelined_requests_are_answered_in_their_first_sixteen_then_the_connection_closes(
        tmp_path: Path, org_key: OrgKey, request_: bytes) -> None:
    # Threat (memory, and every other client's latency): uvicorn parsed every request of a
    # read (256 KiB: thousands) into its queue and read on after each reply. One connection
    # pipelining GET /healthz grew the agent to GBs, and other clients waited seconds. Now
    # the requests over PIPELINED are not read: those before are answered, then it closes.
    from git_credential_codestore.agent.asgi import PIPELINED

    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        with socket.socket(socket.AF_UNIX) as s:  # a client that never reads its replies
            s.connect(a.socket)
            s.settimeout(3)
            sent = 0
            try:
                while sent < 16 * 1024 * 1024:
                    s.sendall(request_ * 2000)
                    sent += len(request_) * 2000
            except OSError:
                pass  # the agent stopped reading (a timeout), or closed: what it should do
            assert sent < 2 * 1024 * 1024, f"the agent read {sent} bytes of pipelined requests"
        rss = int(next(line for line in open(f"/proc/{a.proc.pid}/status") if line.startswith("VmRSS")).split()[1])
        assert rss < 200 * 1024, rss  # kB
        with socket.socket(socket.AF_UNIX) as s:  # a client that reads: its first requests answered, in order, then EOF
            s.connect(a.socket)
            s.settimeout(10)
            s.sendall(request_ * 100)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
        assert len(statuses) >= PIPELINED and b"bad request (" not in out, (len(statuses), out[-300:])  # the front's own 400
        if b"healthz" in request_:  # (token requests the loop answers at once are never queued: each is written as it is read)
            assert len(statuses) <= PIPELINED + 2, len(statuses)
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200
    finally:
        a.stop()


@pytest.mark.parametrize("opening", [
    b"GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n",  # a reply, then CRLFs between requests, which begin none
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/ping HTTP/1.1\r\nHost: a\r\nX-A: ",  # a second request's head trickling
], ids=["crlf-after-a-reply", "head-behind-a-pipelined-request"])
@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_bytes_that_end_no_request_cannot_hold_a_connection_past_the_deadline(
        tmp_path: Path, org_key: OrgKey, opening: bytes, where: str) -> None:
    # Threat (issue 8 item 6, again): a connection held for good by a byte a second. uvicorn
    # stops its keep-alive timer at any read and the deadline began only with a message,
    # so CRLFs after a reply held it; and a reply ended the deadline of the request begun
    # behind it. 128 such connections from each of 8 addresses locked out every client.
    a = start_agent(tmp_path, "--server", "uvicorn", "--request-deadline", "2")
    try:
        s = socket.socket(socket.AF_UNIX) if where == "unix" else socket.socket()
        s.settimeout(3)
        s.connect(a.socket if where == "unix" else ("127.0.0.1", int(a.url.rsplit(":", 1)[1])))
        s.sendall(opening)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < 12 and not closed:
            time.sleep(0.5)
            try:
                s.sendall(b"\r\n" if opening.endswith(b"\r\n\r\n") else b"a")
                s.setblocking(False)
                try:
                    closed = s.recv(100) == b""
                except BlockingIOError:
                    pass
                s.setblocking(True)
            except OSError:
                closed = True
        assert closed and time.monotonic() - t0 < 8, time.monotonic() - t0
        s.close()
    finally:
        a.stop()


def test_a_bad_request_behind_one_in_flight_leaves_that_ones_answer_in_place(tmp_path: Path, org_key: OrgKey) -> None:
    # A revoke pipelined with garbage after it was carried out, and the client told 400.
    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        g = create(a)
        out = raw_exchange(a.socket, b"POST /v1/grants/%s/revoke HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGARBAGE\r\n\r\n"
                           % str(g["id"]).encode())
        assert out.startswith(b"HTTP/1.1 200") and b"revoked" in out and b"HTTP/1.1 400" not in out, out[:300]
    finally:
        a.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_json_nested_past_the_parsers_stack_is_a_bad_request_not_an_internal_error(
        tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # Threat: an unauthenticated 500 and a line in the agent's log per request: RecursionError
    # is no ValueError, and went past "request body is not JSON".
    a = start_agent(tmp_path, "--server", front)
    try:
        body = b"[" * 30000 + b"]" * 30000
        for target in (b"/v1/ping", b"/v1/audit/report", b"/v1/grants"):
            out = raw_exchange(a.socket, b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                               b"Connection: close\r\n\r\n%s" % (target, len(body), body))
            assert out.split(b" ")[1] in (b"400", b"403", b"404"), out[:200]
            assert b"internal error" not in out
    finally:
        err = stopped_log(a)
    assert err.splitlines() == ["codestore agent exiting: stopped"], err[:500]


@pytest.mark.parametrize("front", FRONTS)
def test_no_error_reply_sends_back_a_secret_the_request_carried(tmp_path: Path, org_key: OrgKey, front: str) -> None:
    # The 404 for GET /<a grant's secret> quoted 42 of its 43 random characters, a bad
    # `state` its first 20, and the stdlib front's own errors (an unknown method, a bad
    # version) the whole of it: every error reply now goes out redacted (server.encode).
    a = start_agent(tmp_path, "--server", front)
    try:
        secret = str(create(a)["grant"])
        random_part = secret.split("_", 2)[2]  # csg_<id>_<random>, whose base64url may hold "_" itself
        token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
        for request_ in (f"GET /{secret} HTTP/1.1", f"GET /{token} HTTP/1.1", f"GET /v1/grants?state={secret} HTTP/1.1",
                         f"{secret} / HTTP/1.1", f"GET / {token}"):
            out = raw_exchange(a.socket, f"{request_}\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 4") or out.startswith(b"HTTP/1.1 5"), (request_, out[:200])
            assert random_part[:8].encode() not in out and b"eyJzdWIi" not in out, (request_, out[:300])
    finally:
        a.stop()


def test_the_threads_front_answers_an_http_0_9_request_line_with_a_status_and_logs_no_failed_handshake(
        tmp_path: Path, org_key: OrgKey) -> None:
    cert, key = tls_pair(tmp_path)
    a = start_agent(tmp_path, "--server", "threads", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        out = raw_exchange(a.socket, b"GET /v1/ping\r\n\r\n")  # http.server sent the body alone
        assert out.startswith(b"HTTP/1.1 200 ") and b"Content-Length:" in out, out[:200]
        port = int(a.url.rsplit(":", 1)[1])
        for _ in range(10):  # plain HTTP to the TLS port: a line each in the agent's log
            with contextlib.suppress(OSError):
                raw_exchange(("127.0.0.1", port), b"GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
    finally:
        err = stopped_log(a)
    assert err.splitlines() == ["codestore agent exiting: stopped"], err[:500]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("head", [
    b"Content-Length : 2",  # a space before the colon: http.server kept it under another name, and ignored it
    b"Transfer-Encoding : chunked",
    b"X-A: a\r\n b",  # a folded value
    b"X-A: a\x00b",
], ids=["space-before-colon", "te-space-before-colon", "obs-fold", "nul"])
def test_both_fronts_refuse_a_head_the_other_would_frame_differently(tmp_path: Path, org_key: OrgKey, front: str, head: bytes) -> None:
    # Behind one proxy, two fronts that frame a request differently are how one request is smuggled in another.
    a = start_agent(tmp_path, "--server", front)
    try:
        out = raw_exchange(a.socket, b"POST /v1/ping HTTP/1.1\r\nHost: a\r\n" + head + b"\r\nConnection: close\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 400"), out[:200]
    finally:
        a.stop()


def test_a_client_that_never_reads_its_replies_cannot_hold_its_connection_past_the_deadline(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat (a slot held for good): once the agent's send buffer to a client that never
    # reads was full, the next replies waited in the transport, and every way the front ends
    # a connection (the keep-alive timeout here, a `Connection: close` request, a refusal)
    # called close(), which waits for that buffer to drain, with no deadline left running.
    a = start_agent(tmp_path, "--server", "uvicorn", "--request-deadline", "2")

    def sockets() -> int:
        fds = f"/proc/{a.proc.pid}/fd"
        count = 0
        for fd in os.listdir(fds):
            with contextlib.suppress(FileNotFoundError):  # closed between the listing and its look
                count += os.readlink(f"{fds}/{fd}").startswith("socket:")
        return count

    try:
        request_ = token_request(create(a)["grant"])
        before = sockets()
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1)
        s.connect(a.socket)
        sent, t0 = 0, time.monotonic()
        try:
            while time.monotonic() - t0 < 30:  # one request a write, each answered, none read
                s.sendall(request_)
                sent += 1
                time.sleep(0.001)
        except TimeoutError:
            pass  # the agent's buffers are full and it reads no more: the client goes quiet
        assert sent > 100 and sockets() > before, sent
        quiet = time.monotonic()
        while sockets() > before and time.monotonic() - quiet < 2 + 5 + 6:  # the deadline, the keep-alive idle, slack
            time.sleep(0.25)
        assert sockets() <= before, "the agent still holds a connection whose client reads nothing"
        s.close()
    finally:
        a.stop()


def test_a_connection_aborted_with_replies_queued_writes_nothing_to_the_log(tmp_path: Path, org_key: OrgKey) -> None:
    # Pipelining 16 pings a write and reading none: the deadline aborts the connection while
    # a reply waits for the buffer to drain, and uvicorn marked only its newest (queued) cycle
    # gone: the one answering wrote on to the closed transport, a line in the log each time.
    a = start_agent(tmp_path, "--server", "uvicorn", "--request-deadline", "2")
    try:
        def client() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(a.socket)
                with contextlib.suppress(OSError):
                    for _ in range(1000):
                        s.sendall(b"GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n" * 16)
                        time.sleep(0.02)
                time.sleep(4)  # past the deadline

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert call(Endpoint("unix", a.socket), "GET", "/v1/ping")[0] == 200
    finally:
        err = stopped_log(a)
    assert err.splitlines() == ["codestore agent exiting: stopped"], err[:500]


def test_one_read_of_pipelined_token_requests_is_not_signed_in_one_go(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat (every other client's latency): a grant holder pipelining a thousand token
    # requests in one write had them all signed in one event-loop callback. PIPELINED are
    # answered at once; the rest queue as any request does, and past PIPELINED it closes.
    from git_credential_codestore.agent.asgi import PIPELINED

    a = start_agent(tmp_path, "--server", "uvicorn")
    try:
        g = create(a)
        mint(sandbox_env(g["grant"], sock=a.socket))  # cached: answered at once
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(a.socket)
            s.sendall(token_request(g["grant"]) * 500)
            out = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    out += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
        assert PIPELINED <= len(statuses) <= 2 * PIPELINED + 2 and set(statuses) == {b"200"}, (len(statuses), set(statuses))
        assert out.count(b"token=eyJ") == len(statuses)
    finally:
        a.stop()
