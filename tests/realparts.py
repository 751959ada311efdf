"""Real servers the fleet tests and bench/fleet.py run against: PostgreSQL and SoftHSM2;
a raw request on a real socket (`raw_exchange`), for tests of hostile bytes and for benchmarks;
and a small HTTP server on 127.0.0.1 (`http_server`, `send_json`) for a test's canned answers.

PostgreSQL comes from Debian's `postgresql` package (tests/run.sh installs it):
`initdb` and `pg_ctl` into a temporary directory, listening on 127.0.0.1 on a free
port. PostgreSQL refuses to run as root, so when the suite runs as root the server runs
as `nobody`. The tests' fixtures (one server per session, a database per test) are in
conftest.py. This module imports nothing beyond the standard library (psycopg only when
a database is created): bench/run's venv has no pytest.
"""

from __future__ import annotations

import contextlib
import glob
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator


def _pg_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed; tests/run.sh installs Debian's postgresql package")
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections while the block runs (a server that is
    gone): bound, never listening. Held, not only chosen: with the tests in parallel
    processes, another's server binding port 0 could otherwise be given it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def raw_exchange(address: str | tuple[str, int], data: bytes, timeout: float = 20) -> bytes:
    """Send `data` as it is to a Unix socket path or a (host, port), half-close, and read
    until the server closes: its whole answer.

    No HTTP library in between, so nothing tidies a malformed request up first.
    """
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(address)
        except OSError:
            s.close()
            raise
    else:
        s = socket.create_connection(address, timeout=timeout)
    with s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def serve_in_thread(server: socketserver.BaseServer, poll_interval: float = 0.1) -> None:
    """`server.serve_forever()` on a daemon thread, its listener non-blocking: accept(2) may
    block after poll said "readable" (see its man page), and a blocking listener then held
    `shutdown()` (a fixture's teardown) until some client came: a CI run hung in the OIDC
    issuer's teardown that way, its serve_forever thread in accept()."""
    server.socket.setblocking(False)  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True).start()


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on 127.0.0.1 (a free port) in a thread: yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def recording_host(host: str, port: int = 0, body: bytes = b"") -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on `host` (another loopback address: "elsewhere") answering every GET and
    POST with `body` (200) or 404 when empty: yields its port and the Authorization headers it got."""
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.extend(v for k, v in self.headers.items() if k.lower() == "authorization")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer((host, port), Recorder)
    serve_in_thread(server)
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def send_json(handler: http.server.BaseHTTPRequestHandler, obj: object, status: int = 200) -> None:
    """Answer `obj` as a JSON body with its Content-Length."""
    body = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Postgres:
    """A throwaway PostgreSQL server; `stop`/`start` let fault tests take it away."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = tempfile.mkdtemp(prefix="codestore-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.owner: int | None = None  # the uid and gid its programs run as; None: ours
        if os.getuid() == 0:
            self.owner = 65534  # nobody: PostgreSQL will not run as root
            os.chown(self.root, 65534, 65534)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                    "fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
        self._started = False

    def _run(self, prog: str, *args: str) -> None:
        subprocess.run([os.path.join(self.bin, prog), *args], check=True, capture_output=True, cwd=self.root,
                       user=self.owner, group=self.owner)

    def start(self) -> None:
        """Start it; again after `stop`, on the same port (its URLs stay valid)."""
        for attempt in range(5):
            try:
                self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-o", f"-p {self.port}",
                          "-w", "-t", "60", "start")
                self._started = True
                return
            except subprocess.CalledProcessError:
                # The free port was taken before the server bound it (tests run in parallel
                # processes, each opening connections from ephemeral ports): take another.
                with open(os.path.join(self.root, "log"), errors="replace") as f:
                    taken = "could not bind" in f.read()
                if self._started or not taken or attempt == 4:
                    raise
                self.port = free_port()

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __enter__(self) -> Postgres:
        """Started for a `with` block, destroyed at its end (whatever happened in it)."""
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
# p11-kit's proxy module (Debian's libp11-kit0), which loads SoftHSM2 through the module file
# softhsm2-common installs. Unlike SoftHSM2, it holds a forked child to the standard: a
# child must initialize the module itself before any call (CKR_CRYPTOKI_NOT_INITIALIZED).
P11KIT_PROXY = next(iter(sorted(glob.glob("/usr/lib/*/libp11-kit.so.0"))), "/usr/lib/x86_64-linux-gnu/libp11-kit.so.0")


class SoftHsm:
    """A SoftHSM2 token in a temporary SOFTHSM2_CONF; `away`/`back` take it from under the agent."""

    def __init__(self, root: str, label: str = "codestore", pin: str = "1234") -> None:
        if not os.path.exists(SOFTHSM_MODULE) or not shutil.which("softhsm2-util"):
            raise RuntimeError("SoftHSM2 is not installed; tests/run.sh installs Debian's softhsm2 package")
        self.root, self.label, self.pin = root, label, pin
        self.tokens = os.path.join(root, "tokens")
        os.makedirs(self.tokens)
        self.conf = os.path.join(root, "softhsm2.conf")
        with open(self.conf, "w") as f:
            f.write(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "5678"],
                       check=True, capture_output=True, env=self.env())

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(SOFTHSM2_CONF=self.conf, CODESTORE_PKCS11_MODULE=SOFTHSM_MODULE, CODESTORE_PKCS11_PIN=self.pin)
        return env

    def uri(self, obj: str) -> str:
        return f"pkcs11:token={self.label};object={obj}"

    def away(self) -> None:
        os.rename(self.tokens, self.tokens + ".away")

    def back(self) -> None:
        os.rename(self.tokens + ".away", self.tokens)


P11KIT_CLIENT = next(iter(sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so"))), "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")


class P11KitServer:
    """A network HSM: `p11-kit server` (Debian's p11-kit) exporting a SoftHSM2 token over a Unix
    socket, used through p11-kit's client module. `pause` stops the server's processes
    (SIGSTOP): the client's calls then wait on a connection that stays open, as on a hung HSM."""

    def __init__(self, softhsm: SoftHsm) -> None:
        if not shutil.which("p11-kit") or not os.path.exists(P11KIT_CLIENT):
            raise RuntimeError("p11-kit's server and client module are not installed; tests/run.sh installs Debian's p11-kit")
        self.softhsm = softhsm
        self.socket = os.path.join(softhsm.root, "p11-kit.sock")
        self.proc = subprocess.Popen(["p11-kit", "server", "--foreground", "--provider", SOFTHSM_MODULE, "--name", self.socket,
                                      f"pkcs11:token={softhsm.label}"], env=softhsm.env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("p11-kit server did not start")
            time.sleep(0.02)
        self._paused: list[int] = []

    def env(self) -> dict[str, str]:
        """A client's environment: the token through the server, the module p11-kit's client."""
        return {**self.softhsm.env(), "P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}", "CODESTORE_PKCS11_MODULE": P11KIT_CLIENT}

    def pause(self) -> None:
        """SIGSTOP the server and the process it forked for each client."""
        self._paused = process_tree(self.proc.pid)
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._paused = []

    def stop(self) -> None:
        self.resume()
        for pid in reversed(process_tree(self.proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        for child in children:
            out += process_tree(child)
    return out
