"""The HTTP server: an anchored routing table, token checks, and CGI to `git http-backend`.

Request bodies are streamed into the CGI (chunked bodies de-chunked as they arrive) and
its output is streamed back (HTTP/1.1 chunked unless the CGI gives a length), so a
push of any size uses constant memory. One thread per connection; git keep-alive works
because a body we do not consume closes the connection instead of being misread as the
next request.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl

from .. import git, jsontext
from ..errors import CodestoreError, ConfigError, Refused, redact
from ..tokens import Claims, PublicKey
from ..vocab import SUFFIXES, validate_repo_id
from . import api
from .auth import REALM, authenticate, authorize_git, require_scope
from .hooks import POLICY_ENV
from .repos import EPHEMERAL_NS, RepoStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_JSON_BODY = 64 * 1024
MAX_CONNECTIONS = 1024  # served at once, at most (default_max_connections, --max-connections)
# Seconds a connection may take to send a request's whole head (its request line and
# headers), counted from when the server begins waiting for it: a new connection's first
# request, or the next one on a connection kept alive. A head trickled a byte at a time
# held its thread for as long as each byte came within the per-read timeout.
IDLE_TIMEOUT = 60.0
IO_TIMEOUT = 300  # seconds a body's read or a reply's write may wait (a stalled push)
ACCEPT_PAUSE = 0.1  # seconds without accepting when the process is out of descriptors
MAX_CHUNK_LINE = 1024
IO_SIZE = 64 * 1024

# The routing table. Every pattern is anchored at both ends and matched against the path
# (query split off, percent-decoded once, nothing normalised), so what is checked is
# exactly what reaches http-backend:
#
# - Only the smart protocol: `info/refs` (with a service, checked separately), and the
#   two POST endpoints. The dumb protocol (`objects/...`, `HEAD`, `packed-refs`) would
#   serve files straight out of the repository directory, bypassing upload-pack and
#   the namespace: it is a 404 here.
# - A repository id is letters, digits and `-_./` only, matched after the path is
#   percent-decoded once (as Code Storage reads `team%2Fapp.git`): no `%` left (nothing
#   decoded twice, no encoded `/` or `..` sneaking past the check), no `+` except the one
#   `+ephemeral` or `+import` suffix the pattern itself recognises (each a namespace of
#   the same repository, reached with the base repository's token), no `\`. `..`, `.`, empty
#   components (`//`) and components ending in `.git` are then refused by
#   `vocab.validate_repo_id` (the one validator) rather than cleaned up, so one
#   repository's path can never name another's directory or a file inside it.
# - The repository id is matched non-greedily up to the first `.git/` that is followed
#   by a known endpoint, and `.git` cannot end any component, so the split is unique.
_NAMESPACES = "|".join(re.escape(suffix[1:]) for suffix in SUFFIXES)  # ephemeral|import
_REPO = rf"(?P<repo>[A-Za-z0-9][A-Za-z0-9._/-]*?)(?:\+(?P<ns>{_NAMESPACES}))?\.git"
GIT_ROUTES: list[tuple[str, re.Pattern[str], str | None]] = [
    ("GET", re.compile(rf"^/{_REPO}/info/refs$"), None),  # service from the query
    ("POST", re.compile(rf"^/{_REPO}/git-upload-pack$"), "git-upload-pack"),
    ("POST", re.compile(rf"^/{_REPO}/git-receive-pack$"), "git-receive-pack"),
]
# The REST routes, with their own reasoning, are `api.ENDPOINTS`: everything under /api/.
SERVICES = ("git-upload-pack", "git-receive-pack")
_GIT_PROTOCOL = re.compile(r"^[A-Za-z0-9=:._-]{1,256}$")
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+/ ;=-]{1,200}$")
# ASCII digits only: `str.isdigit` also accepts `²` and `٣`, which `int()` then rejects.
_LENGTH = re.compile(r"^[0-9]{1,18}$")


@dataclass
class ServerState:
    """What every request handler shares: read-only after start, except the log lock."""

    org: str
    keys: Mapping[str, PublicKey]
    store: RepoStore
    http_backend: str
    git_env: Mapping[str, str]
    log_file: BinaryIO
    tls: bool = False
    base_url: str = ""
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, entry: Mapping[str, object]) -> None:
        line = redact(json.dumps(entry, sort_keys=True)) + "\n"
        with self.log_lock:
            self.log_file.write(line.encode("utf-8"))
            self.log_file.flush()


def default_max_connections() -> int:
    """Connections served at once by default: what the process's descriptors allow. A git
    request holds its socket and three pipes to `git http-backend`, and about as many more
    while the CGI starts; 32 are kept for the server itself (its log, its own git runs)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (soft - 32) // 8))


class DevServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them: past it a connection is
    answered 503 and closed at once. Without a cap, idle connections used up the process's
    descriptors, and accept() then failed in a loop: a core busy and every client hung."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    state: ServerState
    max_connections = MAX_CONNECTIONS
    idle_timeout = IDLE_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open = 0  # connections being served
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, object]:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The listening socket stays readable: without a pause serve_forever spins.
                # Connections ending meanwhile give descriptors back.
                time.sleep(ACCEPT_PAUSE)
            raise  # socketserver drops it and polls again

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._open_lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            if not self.state.tls:  # a cleartext answer on a TLS port only reads as a TLS error
                with contextlib.suppress(OSError):
                    request.send(_busy(self.max_connections), socket.MSG_DONTWAIT)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1

    def handle_error(self, request: object, client_address: object) -> None:
        """A client's reset, timeout or failed TLS handshake (OSError, ssl.SSLError) is its own
        doing: no line. Anything else is a bug: one line, never socketserver's traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            print(f"codestore dev-server: connection error: {redact(repr(error))[:300]}", file=sys.stderr, flush=True)

    def server_activate(self) -> None:
        super().server_activate()
        # accept(2) may block after poll said "readable" (its man page: the connection may be
        # gone by then): serve_forever would sit in accept() until the next client, and
        # SIGTERM's shutdown() with it. Accepted sockets are blocking all the same.
        self.socket.setblocking(False)


def _busy(limit: int) -> bytes:
    body = (f"codestore dev-server: {limit} connections are open, the most it serves at once; "
            "retry, or start it with a larger --max-connections\n").encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class DevServer6(DevServer):
    address_family = socket.AF_INET6


class _Paced(io.RawIOBase):
    """A connection's reads, each allowed the time left until `deadline` (a request head's,
    Handler.handle_one_request) or, with none set, the per-read `timeout`."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, timeout: float) -> None:
        self._raw, self._sock, self._timeout = raw, sock, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def head_ended(self) -> None:
        """Back to the per-read timeout, for the body and the reply's writes as well."""
        self.deadline = None
        self._sock.settimeout(self._timeout)

    def readinto(self, buf: WriteableBuffer) -> int | None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head took too long")
            self._sock.settimeout(min(left, self._timeout))
        return self._raw.readinto(buf)

    def close(self) -> None:
        self._raw.close()
        super().close()


class ChunkedReader(io.RawIOBase):
    """A `Transfer-Encoding: chunked` body, de-chunked as it is read (never buffered)."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.left = 0
        self.done = False

    def readable(self) -> bool:
        return True

    def _line(self) -> bytes:
        line = self.raw.readline(MAX_CHUNK_LINE)
        if not line.endswith(b"\n"):
            raise Refused(400, "malformed chunked body")
        return line

    def readinto(self, buf: WriteableBuffer) -> int:
        if self.done:
            return 0
        if self.left == 0:
            size = self._line().split(b";", 1)[0].rstrip(b"\r\n")
            # Hex digits only (RFC 9112 7.1): int() also took "0x2", "+2", "0_2" and " 2 ",
            # which a proxy in front may read otherwise: a smuggled request's opening.
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise Refused(400, "malformed chunk size")
            self.left = int(size, 16)
            if self.left == 0:
                while self._line().strip():  # trailers, up to the empty line
                    pass
                self.done = True
                return 0
        view = memoryview(buf)
        n = self.raw.readinto(view[: min(len(view), self.left)])
        if not n:
            raise Refused(400, "request body ended early")
        self.left -= n
        if self.left == 0 and self._line().strip():
            raise Refused(400, "malformed chunked body")
        return n


class LengthReader(io.RawIOBase):
    def __init__(self, raw: io.BufferedIOBase, length: int) -> None:
        self.raw = raw
        self.left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: WriteableBuffer) -> int:
        if self.left <= 0:
            return 0
        view = memoryview(buf)
        n = self.raw.readinto(view[: min(len(view), self.left)])
        if not n:
            raise Refused(400, "request body ended early")
        self.left -= n
        return n


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Handler(BaseHTTPRequestHandler):
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's, undeclared in its stubs
    protocol_version = "HTTP/1.1"
    # A request line without a version is HTTP/0.9, whose answers carry no status line:
    # a client would see a bare body it cannot tell from success. Answer as HTTP/1.1.
    default_request_version = "HTTP/1.1"
    server_version = "codestore-dev-server"
    sys_version = ""
    timeout = IO_TIMEOUT  # a stalled body or reply frees its thread (a head has its own bound: _Paced)
    server: DevServer

    # ---- plumbing -------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self._paced = _Paced(self.rfile.detach(), self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._paced)
        # A response is a few small writes (headers, chunks, the terminator). With Nagle on,
        # the second small write waits for the client's delayed ACK: ~40 ms per exchange.
        # Writes are also coalesced below, so NODELAY costs no extra packets.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        # The next request's whole head within idle_timeout of now (parse_request ends it):
        # BaseHTTPRequestHandler reads it, and closes the connection on TimeoutError.
        self._paced.deadline = time.monotonic() + self.server.idle_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()  # reads the headers
        finally:
            self._paced.head_ended()

    def _take_headers(self) -> bytes:
        """The buffered status line and headers plus the blank line, not yet written."""
        self._headers_buffer.append(b"\r\n")
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        return head

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the JSON request log replaces http.server's stderr lines

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        self.started = time.monotonic()
        self.logged = False
        raw_path, _, query = self.path.partition("?")
        self.entry: dict[str, object] = {
            "time": _now(),
            "method": self.command,
            "path": raw_path[:500],
            "remote": self.client_address[0] if self.client_address else None,
            "repo": None,
            "ephemeral": False,
            "service": None,
            "status": None,
            "scopes": None,
            "sub": None,
            "kid": None,
            "reason": None,
        }
        self.body_consumed = False  # until the framing headers are understood
        self.started_response = False
        try:
            self._framing()
            self.body_consumed = self.command in ("GET", "HEAD") and not self._has_body()
            self._dispatch(raw_path, query)
        except Refused as e:
            self._note_claims(e.claims if isinstance(e.claims, Claims) else None)
            headers = {}
            if e.status == 401:
                # git needs the Basic challenge to ask its credential helper.
                scheme = "Bearer" if self.entry.get("api") else "Basic"
                headers["WWW-Authenticate"] = f'{scheme} realm="{REALM}"'
            self._refuse(e.status, e.reason, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.entry["reason"] = self.entry["reason"] or "client went away"
        except Exception as e:  # noqa: BLE001 - one request must never take the server down
            sys.stderr.write(f"codestore dev-server: internal error: {redact(traceback.format_exc())}\n")
            self.close_connection = True
            if self.started_response:
                self.entry["reason"] = f"internal error after the response started ({type(e).__name__})"
            else:
                self._refuse(500, f"internal error ({type(e).__name__}); see the server's stderr")
        finally:
            self._write_log()

    def _write_log(self) -> None:
        """Log the request once, before the response's last bytes leave.

        A client that reads the log the moment its request completes then finds it.
        """
        if self.logged:
            return
        self.logged = True
        self.entry["duration_ms"] = int((time.monotonic() - self.started) * 1000)
        try:
            self.server.state.log(self.entry)
        except Exception:  # noqa: BLE001 - a full disk must not kill request threads
            pass

    def _framing(self) -> None:
        """Decide how long the body is, or refuse: ambiguity here is request smuggling."""
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        encodings = self.headers.get_all("Transfer-Encoding") or []
        self.body_length: int | None = 0
        if len(lengths) > 1:
            raise Refused(400, "conflicting Content-Length headers")
        if len(encodings) > 1:
            raise Refused(400, "more than one Transfer-Encoding header")
        if lengths and encodings:
            raise Refused(400, "both Content-Length and Transfer-Encoding sent")
        if encodings:
            te = encodings[0].strip().lower()
            if te != "chunked":
                raise Refused(501, f"transfer encoding {te[:40]!r} is not supported")
            self.body_length = None
        elif lengths:
            (length,) = lengths
            if not _LENGTH.match(length):
                raise Refused(400, f"bad Content-Length {length[:20]!r}: want a decimal number of bytes")
            self.body_length = int(length)

    def _has_body(self) -> bool:
        return self.body_length is None or self.body_length > 0

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, oversized headers): logged like ours."""
        entry = {
            "time": _now(),
            "method": getattr(self, "command", None),
            "path": (getattr(self, "path", "") or "")[:500],
            "remote": self.client_address[0] if self.client_address else None,
            "status": code,
            "reason": redact(" ".join((message or explain or "").split()))[:300] or None,
        }
        try:
            self.server.state.log(entry)
        except Exception:  # noqa: BLE001 - a full disk must not kill request threads
            pass
        self.close_connection = True
        super().send_error(code, message, explain)

    def _note_claims(self, claims: Claims | None) -> None:
        if claims is not None:
            self.entry["scopes"] = list(claims.scopes)
            self.entry["sub"] = claims.sub[:200]
            self.entry["kid"] = claims.kid

    def _refuse(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        self.entry["status"] = status
        self.entry["reason"] = reason
        if self.started_response:
            self.close_connection = True
            return
        if self.entry.get("api"):
            self._send(status, (json.dumps({"error": reason}) + "\n").encode(), "application/json", headers)
        else:
            self._send(status, (reason + "\n").encode(), "text/plain; charset=utf-8", headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None) -> None:
        self.entry["status"] = status
        self.started_response = True
        if not self.body_consumed:
            # A body we did not read would be parsed as the next request: close instead.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._write_log()
        # One write for headers and body: one segment on the wire for a small answer.
        self.wfile.write(self._take_headers() + (body if self.command != "HEAD" else b""))

    def _body_reader(self) -> io.RawIOBase:
        if self.body_length is None:
            return ChunkedReader(self.rfile)
        return LengthReader(self.rfile, self.body_length)

    # ---- routing ----------------------------------------------------------------------

    def _dispatch(self, path: str, query: str) -> None:
        if not path.startswith("/") or len(path) > 1024:
            raise Refused(400, "bad request target")
        if path == "/api" or path.startswith("/api/"):
            self.entry["api"] = True
            endpoint, path_repo = api.route(self.command, path)
            return self._api(endpoint, path_repo, path, query)
        if "%" in path:
            # Code Storage reads percent-encoded ids (team%2Fapp.git), and the credential helper
            # mints for the decoded id. Decoded once, here; what is matched below (and reaches
            # http-backend) is the decoded path, whose id may hold no `%`: nothing is decoded twice.
            from urllib.parse import unquote

            try:
                path = unquote(path, errors="strict")
            except UnicodeDecodeError:
                raise Refused(400, "bad request target") from None
        for method, pattern, service in GIT_ROUTES:
            m = pattern.match(path)
            if m and self.command == method:
                return self._git(m.group("repo"), m.group("ns"), service, query)
        raise Refused(404, "not found: this server speaks only Git smart HTTP and /api/")

    def _git(self, repo: str, namespace: str | None, service: str | None, query: str) -> None:
        state = self.server.state
        self.entry["repo"], self.entry["ephemeral"] = repo, namespace == EPHEMERAL_NS
        self.entry["namespace"] = namespace
        try:
            validate_repo_id(repo)
        except ConfigError as e:
            raise Refused(404, str(e)) from None
        if service is None:
            params = parse_qsl(query, keep_blank_values=True)
            if len(params) != 1 or params[0][0] != "service" or params[0][1] not in SERVICES:
                raise Refused(404, "only the smart protocol is served: want ?service=git-upload-pack or git-receive-pack")
            service = params[0][1]
            suffix, cgi_query = "/info/refs", f"service={service}"
        else:
            suffix, cgi_query = "/" + service, ""
        self.entry["service"] = service
        # Authenticate before revealing whether the repository exists.
        claims = authenticate(self.headers.get("Authorization"), state.keys, state.org)
        self._note_claims(claims)
        authorize_git(claims, repo, service)
        if not state.store.exists(repo):
            raise Refused(404, f"repository {repo!r} does not exist; create it with: codestore repo create {repo}")
        self._run_cgi(repo, namespace, suffix, cgi_query, claims)

    # ---- CGI --------------------------------------------------------------------------

    def _run_cgi(self, repo: str, namespace: str | None, suffix: str, query: str, claims: Claims) -> None:
        state = self.server.state
        env = dict(state.git_env)
        env.update(
            GIT_PROJECT_ROOT=state.store.root,
            GIT_HTTP_EXPORT_ALL="1",
            GATEWAY_INTERFACE="CGI/1.1",
            SERVER_PROTOCOL="HTTP/1.1",
            REQUEST_METHOD=self.command,
            PATH_INFO=f"/{repo}.git{suffix}",
            QUERY_STRING=query,
            REMOTE_ADDR=str(self.client_address[0]),
            # http-backend enables receive-pack only for an authenticated user; we have
            # already decided who may push.
            REMOTE_USER=_printable(claims.sub) or "t",
            **{POLICY_ENV: json.dumps([[p, list(ops)] for p, ops in claims.refs])},
        )
        if namespace:
            env["GIT_NAMESPACE"] = namespace
        ctype = self.headers.get("Content-Type")
        if ctype and _CONTENT_TYPE.match(ctype):
            env["CONTENT_TYPE"] = ctype
        if self.body_length is not None and self.headers.get("Content-Length") is not None:
            env["CONTENT_LENGTH"] = str(self.body_length)
        encoding = self.headers.get("Content-Encoding")
        if encoding:
            if encoding.strip().lower() not in ("gzip", "x-gzip", "identity"):
                raise Refused(415, f"content encoding {encoding[:20]!r} is not supported")
            env["HTTP_CONTENT_ENCODING"] = encoding.strip().lower()
        proto = self.headers.get("Git-Protocol")
        if proto and _GIT_PROTOCOL.match(proto):
            env["GIT_PROTOCOL"] = proto
        body = self._body_reader()

        try:
            proc = subprocess.Popen(
                [state.http_backend],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=state.store.root,
            )
        except OSError as e:
            raise Refused(500, f"cannot run git http-backend: {e.strerror}") from None
        assert proc.stdin and proc.stdout and proc.stderr
        stdout = proc.stdout
        assert isinstance(stdout, io.BufferedReader)  # Popen's default buffering; read1 relays what is there
        feeder = _Feeder(body, proc.stdin)
        errors = _Drain(proc.stderr)
        errors.start()
        if state.tls:
            # One SSL connection must not be read and written from two threads at once.
            # git's smart HTTP is request-then-response, so feeding the whole body first
            # cannot deadlock against http-backend's output.
            feeder.run()
        else:
            feeder.start()
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            stdout.close()
            if feeder.ident is not None:
                feeder.join(timeout=30)
            rc = proc.wait()
            errors.join(timeout=5)
            self.body_consumed = feeder.complete
            if feeder.error is not None or feeder.is_alive() or not feeder.complete:
                self.close_connection = True
            if feeder.error is not None and not self.entry.get("reason"):
                self.entry["reason"] = feeder.error
            if rc != 0 and not self.entry.get("reason"):
                self.entry["reason"] = f"http-backend exit {rc}: {errors.last_line()}"

        try:
            self._relay(stdout, errors, finish)
        finally:
            finish()

    def _relay(self, out: io.BufferedReader, errors: _Drain, finish: Callable[[], None]) -> None:
        """Parse the CGI's header block, then stream its body to the client."""
        status, reason, headers = 200, "OK", []
        length: int | None = None
        while True:
            line = out.readline(8192)
            if not line:
                raise Refused(500, f"git http-backend failed: {errors.wait_last_line() or 'no output'}")
            line = line.rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "status":
                code, _, reason = value.partition(" ")
                status = int(code) if code.isdigit() else 500
            elif name.lower() == "content-length" and value.isdigit():
                length = int(value)
            elif name.lower() not in ("connection", "transfer-encoding"):
                headers.append((name, value))
        if status >= 400:
            # http-backend's error bodies are often empty: say why in one line, preferring
            # its own words (stderr) over a bare status.
            text = out.read(IO_SIZE).decode("utf-8", "replace").strip().splitlines()
            why = errors.wait_last_line() if status >= 500 or not text else text[-1]
            raise Refused(status, f"git http-backend failed: {why or reason or status}")
        self.entry["status"] = status
        chunked = length is None and self.request_version == "HTTP/1.1"
        if length is None and not chunked:
            self.close_connection = True
        self.started_response = True
        self.send_response(status, reason or None)
        for name, value in headers:
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        # The header block rides with the first piece of body, and each chunk's framing with
        # its data: one write per piece, never a tiny write waiting behind another.
        head = self._take_headers()
        while True:
            data = out.read1(IO_SIZE)
            if not data:
                break
            self.wfile.write(head + (b"%x\r\n%s\r\n" % (len(data), data) if chunked else data))
            head = b""
        finish()
        self._write_log()
        tail = head + (b"0\r\n\r\n" if chunked else b"")
        if tail:
            self.wfile.write(tail)
        self.wfile.flush()

    # ---- REST -------------------------------------------------------------------------

    def _api(self, endpoint: api.Endpoint, path_repo: str | None, path: str, query: str) -> None:
        state = self.server.state
        self.entry["endpoint"] = endpoint.name
        if endpoint.handler is None:
            # Whatever the body holds (a commit pack is not JSON), the answer is the same;
            # it is left unread and the connection closed after the answer.
            self._note_claims(authenticate(self.headers.get("Authorization"), state.keys, state.org))
            raise Refused(501, f"{endpoint.name} ({endpoint.method} {path[:100]}) is not implemented by codestore dev-server; see docs/dev-server.md")
        body: dict[str, object] = {}
        if self.body_length is not None and self.body_length > MAX_JSON_BODY:
            # Refused before reading: a declared length alone must not hold a thread.
            raise Refused(413, f"request body larger than {MAX_JSON_BODY // 1024} KiB")
        if self._has_body():
            data = _read_upto(self._body_reader(), MAX_JSON_BODY + 1)
            if len(data) > MAX_JSON_BODY:
                raise Refused(413, f"request body larger than {MAX_JSON_BODY // 1024} KiB")
            self.body_consumed = True
            if data.strip():
                if self.command in ("GET", "HEAD"):
                    raise Refused(400, f"a {self.command} request carries no body")
                try:
                    parsed = jsontext.loads(data)
                except ValueError:
                    raise Refused(400, "request body is not JSON") from None
                if not isinstance(parsed, dict):
                    raise Refused(400, "request body must be a JSON object")
                body = parsed
        self.body_consumed = True
        claims = authenticate(self.headers.get("Authorization"), state.keys, state.org)
        self._note_claims(claims)
        self.entry["repo"] = (path_repo or claims.repo)[:200] or None
        if endpoint.scope:
            require_scope(claims, endpoint.scope)
        if endpoint.path is not None or endpoint.name == "create_repo":
            # The token says which repository may be touched; a versionless path only
            # says which one the caller means, and must agree.
            if not claims.repo:
                raise Refused(401, f"{endpoint.name} needs a token for one repository; this one names none (org-wide)", claims)
            if path_repo is not None and path_repo != claims.repo:
                raise Refused(403, f"wrong repo: token is for repository {claims.repo[:200]!r}, not {path_repo[:200]!r}", claims)
            try:
                validate_repo_id(claims.repo)
            except ConfigError as e:
                raise Refused(400, str(e)) from None
        if body.get("target_is_ephemeral") is True or body.get("ephemeral") is True or "ephemeral=true" in query:
            self.entry["ephemeral"] = True
        call = api.Call(
            store=state.store, claims=claims, repo=claims.repo, query=parse_qsl(query, keep_blank_values=True),
            body=body, headers=self.headers, method=self.command, base_url=state.base_url, org=state.org, keys=state.keys,
        )
        reply = endpoint.handler(call)
        if reply.json is not None:
            self._send(reply.status, (json.dumps(reply.json) + "\n").encode(), "application/json", reply.headers)
        else:
            self._send(reply.status, reply.data, reply.ctype, reply.headers)


class _Feeder(threading.Thread):
    """Copies the request body into the CGI's stdin, then closes it."""

    def __init__(self, body: io.RawIOBase, sink: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.body, self.sink = body, sink
        self.error: str | None = None
        self.complete = False

    def run(self) -> None:
        buf = bytearray(IO_SIZE)
        view = memoryview(buf)
        try:
            while True:
                n = self.body.readinto(view)
                if not n:
                    self.complete = True
                    break
                self.sink.write(view[:n])
        except Refused as e:
            self.error = e.reason
        except BrokenPipeError:
            self.error = "http-backend stopped reading the request body"
        except OSError as e:
            self.error = f"reading the request body failed: {e.strerror or type(e).__name__}"
        finally:
            try:
                self.sink.close()
            except OSError:
                pass


class _Drain(threading.Thread):
    """Collects the CGI's stderr (the tail only) so a failure can be reported in one line."""

    def __init__(self, src: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.src = src
        self.tail = b""

    def run(self) -> None:
        for chunk in iter(lambda: self.src.read(4096), b""):
            self.tail = (self.tail + chunk)[-4096:]

    def last_line(self) -> str:
        lines = [ln for ln in self.tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        return redact(lines[-1].strip())[:200] if lines else ""

    def wait_last_line(self) -> str:
        self.join(timeout=5)
        return self.last_line()


def _read_upto(reader: io.RawIOBase, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = reader.read(min(IO_SIZE, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:200]


def find_http_backend(env: Mapping[str, str]) -> str:
    out = git.run(["--exec-path"], env=env)
    path = os.path.join(out.stdout.strip(), "git-http-backend")
    if not os.access(path, os.X_OK):
        raise CodestoreError(f"git http-backend not found at {path}; install git's full package (git-core)")
    return path


def make_server(host: str, port: int, state: ServerState, wrap: Callable[[socket.socket], socket.socket] | None = None) -> DevServer:
    cls = DevServer6 if ":" in host else DevServer
    try:
        server = cls((host, port), Handler, bind_and_activate=True)
    except OSError as e:
        raise CodestoreError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0 picks a free one)") from None
    if wrap is not None:
        server.socket = wrap(server.socket)
    server.state = state
    return server
