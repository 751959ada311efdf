"""Benchmark: the agent as a fleet service (issue 9's numbers), ratios against baselines of the same run.

1. tokens/s of one replica, 64 concurrent clients, a new connection per token (as git
   helpers connect), against raw ES256 signatures/s of the same key in one thread; p50,
   p99 and the longest request (stalls).
2. the same load with 100k grants in the store against 10 grants.
3. `grant create` and `revoke` (admin calls) with 100k grants: median and p99.
4. revocation propagation between two replicas on one PostgreSQL: revoke on A, time
   until B refuses.
5. audit trail propagation on the same pair: a push reported to A, time until
   `codestore audit` asking B lists it (A adds its buffered rows once a second).

The load runs in 2 client processes (an epoll loop each, a new connection per token) on
this machine, so clients and agent share its cores (a real fleet's clients are elsewhere):
the ratios are a floor. The agent's and the load generator's CPU per token are printed
beside each load, so a reader can see which of the two the cores were spent on.

Run: python bench/fleet.py [--seconds 5] [--clients 64]   (needs codestore[fleet]; 4. needs PostgreSQL)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import secrets
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchenv import hermetic_env, write_key  # noqa: E402

from git_credential_codestore import keys  # noqa: E402
from git_credential_codestore.agent import wire  # noqa: E402
from git_credential_codestore.agent.client import Endpoint, call  # noqa: E402
from git_credential_codestore.secrets import Secret  # noqa: E402

PROCESSES = 2  # load generator processes, one per core here
# Before each measured load: every agent process reads a grant from the store on its first
# use (then from its cache, kept fresh by the poll), so with --workers N each of the 1000
# grants of the 100k-grant load is fetched N times; the measurement is of the steady state.
WARM_UP = 2.0


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


def _worker(sock_path: str, requests: list[bytes], clients: int, seconds: float, out: multiprocessing.Queue) -> None:
    """`clients` connections at once, each a fresh connection per token, on one epoll loop.

    The load generator shares the machine's cores with the agent, so its own CPU per
    request is taken from the agent: non-blocking sockets, pre-built requests and a bare
    epoll loop (no threads, no HTTP library) keep it to a few system calls per token.
    """
    ep = select.epoll()
    conns: dict[int, tuple[socket.socket, float, list[bytes]]] = {}
    latencies: list[float] = []
    errors = 0
    first_error = ""
    n = 0
    start = time.monotonic() + 0.2
    while time.monotonic() < start:
        time.sleep(0.001)
    end = start + seconds

    def open_one() -> None:
        nonlocal n, errors, first_error
        req = requests[n % len(requests)]
        n += 1
        t0 = time.perf_counter()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            s.connect(sock_path)
            s.send(req)  # a few hundred bytes: always fits the socket's buffer
        except OSError as e:
            errors += 1
            first_error = first_error or f"connect: {e}"
            s.close()
            return
        conns[s.fileno()] = (s, t0, [])
        ep.register(s.fileno(), select.EPOLLIN)

    for _ in range(clients):
        open_one()
    while conns:
        for fd, _ev in ep.poll(1.0):
            s, t0, chunks = conns[fd]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
                chunks.clear()
            if chunk:
                chunks.append(chunk)
                continue
            ep.unregister(fd)
            del conns[fd]
            s.close()
            if chunks and chunks[0].startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
                first_error = first_error or repr(b"".join(chunks)[-200:])
            if time.monotonic() < end:
                open_one()
    if first_error:
        print(f"   (load generator: {errors} errors, the first: {first_error})", file=sys.stderr)
    out.put((latencies, errors))


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
    """One load's outcome: tokens/s, latencies, errors, and CPU per token on each side."""

    def __init__(self, sock: str, requests: list[bytes], clients: int, seconds: float, agent_pid: int) -> None:
        a0, c0 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        self.rate, self.lat, self.errors = load(sock, requests, clients, seconds)
        a1, c1 = agent_cpu(agent_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        n = max(1, len(self.lat))
        self.agent_us = (a1 - a0) / n * 1e6
        self.client_us = ((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)) / n * 1e6


def load(sock: str, requests: list[bytes], clients: int, seconds: float) -> tuple[float, list[float], int]:
    q: multiprocessing.Queue = multiprocessing.Queue()
    per = max(1, clients // PROCESSES)
    procs = [multiprocessing.Process(target=_worker, args=(sock, requests[i::PROCESSES] or requests, per, seconds, q)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in procs:
        part, bad = q.get()
        lat += part
        errors += bad
    for p in procs:
        p.join()
    return len(lat) / seconds, lat, errors


def bulk_grants(state_dir: str, n: int, known: int) -> list[str]:
    """Put n grants straight into a stopped agent's store (setup only); returns `known` secrets."""
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(state_dir).open()
    out: list[str] = []
    try:
        with store.db.transaction() as tx:
            now = int(time.time())
            for i in range(n):
                gid = secrets.token_hex(6)
                secret = f"{g.SECRET_PREFIX}{gid}_{secrets.token_urlsafe(32)}"
                grant = g.Grant(id=gid, secret_sha256=g._hash(secret), repos=["team/*"], scopes=["git:read"], max_ttl=900,
                                sub=f"bench-{i}", created_at=now)
                grant.seq = store._next_seq(tx)
                store._insert(tx, grant)
                if i < known:
                    out.append(secret)
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


def report(name: str, r: Load, raw: float) -> None:
    print(f"   {name:<14} {r.rate:6.0f} tokens/s ({r.rate / raw:.2f} of raw signing)  p50 {pct(r.lat, 50) * 1000:5.1f} ms  "
          f"p99 {pct(r.lat, 99) * 1000:5.1f} ms  max {max(r.lat, default=0) * 1000:6.1f} ms  errors {r.errors}  "
          f"CPU/token: agent {r.agent_us:4.0f} us, load generator {r.client_us:4.0f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--grants", type=int, default=100_000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="agent serve --workers N for the loads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = environment(tmp)
        raw = signing_rate(env)
        print(f"raw ES256 signing, one thread of this process: {raw:7.0f} signs/s")

        # 1. one replica, 10 grants
        serve = ("--workers", str(args.workers)) if args.workers > 1 else ()
        proc, sock, _ = start_agent(env, "small", *serve)
        try:
            small = [str(call(Endpoint("unix", sock), "POST", "/v1/grants", {"repos": ["team/*"]}, env=env)[1]["grant"]) for _ in range(10)]
            reqs = [token_request(s, f"team/r{i}") for i, s in enumerate(small)]
            load(sock, reqs, args.clients, WARM_UP)
            print(f"1./2. {args.clients} concurrent clients, a new connection per token, {args.seconds:.0f} s each, "
                  f"{args.workers} agent process(es):")
            small_load = Load(sock, reqs, args.clients, args.seconds, proc.pid)
            report("10 grants", small_load, raw)
        finally:
            stop(proc)

        # 2./3. 100k grants
        state = os.path.join(tmp, "state-big")
        proc, sock, _ = start_agent(env, "big")
        stop(proc)
        t0 = time.perf_counter()
        known = bulk_grants(state, args.grants, 1000)
        print(f"   ({args.grants} grants written to the store in {time.perf_counter() - t0:.1f} s, setup)")
        proc, sock, _ = start_agent(env, "big", *serve)
        try:
            reqs = [token_request(s, f"team/r{i}") for i, s in enumerate(known)]
            load(sock, reqs, args.clients, WARM_UP)
            big_load = Load(sock, reqs, args.clients, args.seconds, proc.pid)
            report(f"{args.grants} grants", big_load, raw)
            print(f"   throughput with {args.grants} grants / with 10: {big_load.rate / small_load.rate:.2f}")
            creates, revokes = admin_latency(sock, env)
            print(f"3. with {args.grants} grants: grant create median {statistics.median(creates) * 1000:.1f} ms "
                  f"p99 {pct(creates, 99) * 1000:.1f} ms; revoke median {statistics.median(revokes) * 1000:.1f} ms "
                  f"p99 {pct(revokes, 99) * 1000:.1f} ms")
        finally:
            stop(proc)

        if not args.no_postgres:
            propagation(env)
    return 0


def propagation(env: dict[str, str], rounds: int = 20) -> None:
    sys.path.insert(0, os.path.join(ROOT))
    from tests.realparts import Postgres

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
                assert _mint(sock_b, req).startswith(b"HTTP/1.1 200")
                call(Endpoint("unix", sock_a), "POST", f"/v1/grants/{g['id']}/revoke", env=env)
                t0 = time.perf_counter()
                while _mint(sock_b, req).startswith(b"HTTP/1.1 200"):
                    time.sleep(0.002)
                times.append(time.perf_counter() - t0)
            print(f"4. revocation on replica A refused by replica B (PostgreSQL, {rounds} rounds): "
                  f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
            seen = audit_propagation(sock_a, sock_b, env, rounds)
            print(f"5. push reported to replica A listed by an audit query on replica B ({rounds} rounds): "
                  f"median {statistics.median(seen) * 1000:.0f} ms, max {max(seen) * 1000:.0f} ms")
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


def _mint(sock: str, req: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        s.sendall(req)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


if __name__ == "__main__":
    raise SystemExit(main())
