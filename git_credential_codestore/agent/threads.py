"""The agent's HTTP front from the standard library: a thread per connection.

For installs without the fleet extra (a developer machine, a sandbox image): the
helpers' agent must run on what core codestore installs. The fleet front (`asgi.py`,
uvicorn) replaces it when installed; both apply the same rules from `server.py`
(framing, peer uid, per-peer fairness, deadlines).

At most MAX_CONNECTIONS at once, and at most PER_PEER from one network address; a
read timeout per operation and a whole-request deadline enforced by a reaper thread
that cuts the connection by its file descriptor, so a TLS connection (whose socket
object the TLS wrap replaces, even during a slow handshake) is cut like any other.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler

from ..errors import redact
from .discovery import unix_address
from .server import (
    CONNECTION_DEADLINE,
    IO_TIMEOUT,
    MAX_HEAD,
    Agent,
    Caller,
    Slots,
    admit,
    encode,
    framing,
    identify,
    respond,
    share,
)


class Reaper:
    """Cuts connections that outlive the request deadline (slowloris), one thread for all."""

    def __init__(self, deadline: float = CONNECTION_DEADLINE) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._fds: dict[int, float] = {}
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def watch(self, fd: int) -> None:
        with self._lock:
            self._fds[fd] = time.monotonic() + self.deadline

    def forget(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                # Under the lock: a watched fd is open until forget(), so it is still ours.
                for fd in [fd for fd, deadline in self._fds.items() if deadline < now]:
                    del self._fds[fd]
                    try:
                        s = socket.socket(fileno=os.dup(fd))
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        finally:
                            s.close()
                    except OSError:
                        pass


class _Head:
    """The connection's reader, cut at MAX_HEAD bytes of request line and headers.

    The standard library allows a request line of 64 KiB and 100 header lines of 64 KiB
    each (6.5 MB a connection); the fleet front caps the head at MAX_HEAD. Over it,
    readline raises LineTooLong: the handler answers 431 (headers) or 414 (the request
    line). The body (`read`) is not counted: `framing` caps it.
    """

    def __init__(self, f: io.BufferedIOBase) -> None:
        self._f = f
        self.left = MAX_HEAD

    def readline(self, limit: int = -1) -> bytes:
        line = self._f.readline(self.left + 1 if limit < 0 else min(limit, self.left + 1))
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request head over {MAX_HEAD} bytes")
        return line

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


_NOT_TCHAR = frozenset('\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17'
                       '\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x7f "(),/:;<=>?@[\\]{}')  # RFC 9110's tchar: what a header name may hold


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "codestore-agent"
    sys_version = ""
    timeout = IO_TIMEOUT
    server: _Listener
    caller: Caller

    def setup(self) -> None:
        self.fd = self.request.fileno()
        self.server.front.reaper.watch(self.fd)
        if self.server.tls is not None:
            self.request.settimeout(IO_TIMEOUT)
            try:
                self.request = self.server.tls.wrap_socket(self.request, server_side=True)
            except BaseException:
                # finish() will not run: stop watching before the fd is closed and reused.
                self.server.front.reaper.forget(self.fd)
                raise
        super().setup()
        self.rfile = _Head(self.rfile)  # type: ignore[assignment]

    unread = False  # the reply went out before the request was read in full

    def finish(self) -> None:
        try:
            super().finish()
            if self.unread:
                self._linger()
        finally:
            self.server.front.reaper.forget(self.fd)

    def _linger(self) -> None:
        """Close only after the client has read our refusal.

        Closing a socket with unread input resets the connection, and the reset can
        destroy the reply in flight: the caller would see "connection reset" instead of
        the reason. Bounded by the reaper's deadline like any other read.
        """
        try:
            self.request.shutdown(socket.SHUT_WR)
            self.request.settimeout(1.0)
            for _ in range(64):
                if not self.request.recv(65536):
                    break
        except OSError:
            pass

    def handle(self) -> None:
        self.close_connection = True
        self.request_version = self.protocol_version  # for a reply sent before parsing
        self.caller = self.server.caller_of(self.request, self.client_address)
        refusal = admit(self.server.agent, self.caller)
        if refusal is not None:
            self.unread = True
            self._reply(*refusal)
            return
        try:
            self.handle_one_request()
        except (OSError, ssl.SSLError):
            pass  # the client went away or timed out; nothing to answer
        except http.client.LineTooLong:  # the request line (a header's is answered by parse_request)
            self.send_error(414, "request line too long")

    def _header(self, name: str) -> str | None:
        """A header's value; a repeated one's values joined, as HTTP reads a list (RFC 9110 5.3):
        two Content-Lengths are then no number, refused as the uvicorn front refuses them."""
        values = self.headers.get_all(name)
        return ", ".join(values) if values else None

    def _serve(self) -> None:
        self.unread = True
        # What uvicorn's parser (llhttp) refuses, refused here too: a name that is no token,
        # a folded or NUL-bearing value. Two fronts that frame a request differently behind
        # one proxy are how requests are smuggled.
        # ("Content-Length : 5" is a line email's parser cannot read: it ends the head there, a defect.)
        if getattr(self.headers, "defects", None) or any(
                not name or not name.isascii() or any(c in _NOT_TCHAR for c in name) or any(c in value for c in "\r\n\x00")
                for name, value in self.headers.items()):
            self._reply(400, {"error": "bad request (a header that is not name: value on one line)"})
            return
        refusal, length = framing(self._header)
        if refusal is not None:
            self._reply(*refusal)
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            return  # the client hung up mid-body
        self.unread = False
        status, data, ctype = respond(self.server.agent, self.caller, self.command, self.path, self._header, body)
        self._send(status, data, ctype)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def _reply(self, status: int, reply: Mapping[str, object]) -> None:
        self._send(status, *encode(status, reply))

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        # A reply has its status line and headers even to an HTTP/0.9 request line (`GET /x`):
        # http.server leaves both out for one, and the body alone went back.
        self.request_version = self.protocol_version
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self.unread = True
        self._reply(code, {"error": f"bad request ({message or code})"})

    def log_message(self, format: str, *args: object) -> None:
        pass  # the audit log is the record; request lines could carry a mistaken secret


class _Listener(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """Shared by the Unix and TCP listeners: thread per connection, bounded overall and per peer."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # bursts of helpers (the kernel caps it at somaxconn)
    agent: Agent
    front: ThreadFront
    tls: ssl.SSLContext | None = None
    transport = "socket"
    bound_grant: str | None = None
    path = ""
    inode = 0

    def server_activate(self) -> None:
        super().server_activate()
        # accept(2) may block after poll said "readable" (its man page: the connection may be
        # gone by then). A blocking listener would then sit in accept() until the next client,
        # and shutdown() (a drain, SIGTERM) with it. Non-blocking, serve_forever polls on;
        # accepted sockets are blocking all the same (Linux: none inherit the flag).
        self.socket.setblocking(False)  # type: ignore[attr-defined]  # on both listeners

    def caller_of(self, sock: socket.socket, address: object) -> Caller:
        return identify(sock, address, self.transport, self.bound_grant)

    def _peer(self, client_address: object) -> str:
        return share(self.transport, client_address, self.bound_grant)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self.front.take(self._peer(client_address)):
            if self.tls is None:  # never cleartext on a TLS port: the client would see a TLS error
                try:
                    request.sendall(b'HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.front.release(self._peer(client_address))

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # ssl.SSLError too: a peer's failed handshake, reset or timeout is its own doing
            return  # (a line each, at the rate of anyone who can connect, as the uvicorn front never writes)
        print(f"codestore agent: connection error: {redact(repr(error))}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class UnixListener(_Listener, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        with unix_address(self.server_address) as addr:  # type: ignore[arg-type]
            self.socket.bind(addr)
        os.chmod(self.server_address, 0o600)  # type: ignore[arg-type]
        self.path = str(self.server_address)
        self.inode = os.stat(self.server_address).st_ino  # type: ignore[arg-type]


class TCPListener(_Listener, socketserver.TCPServer):
    allow_reuse_address = True
    transport = "tcp"


class ThreadFront:
    """Listeners on threads; `server.serve` drives it through listen_unix/listen_tcp/drain."""

    name = "threads"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.reaper = Reaper(agent.request_deadline)
        self.slots = Slots()
        self.take, self.release = self.slots.take, self.slots.release
        self._listeners: list[_Listener] = []

    @property
    def in_flight(self) -> int:
        return self.slots.total

    def _start(self, srv: _Listener, **attrs: object) -> _Listener:
        srv.agent, srv.front = self.agent, self
        for k, v in attrs.items():
            setattr(srv, k, v)
        self._listeners.append(srv)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.25}, daemon=True).start()
        return srv

    def listen_unix(self, path: str, transport: str = "socket", bound_grant: str | None = None,
                    sock: socket.socket | None = None) -> _Listener:
        assert sock is None, "workers need the fleet front"
        return self._start(UnixListener(path, Handler), transport=transport, bound_grant=bound_grant)

    def listen_tcp(self, address: tuple[str, int], tls: ssl.SSLContext | None,
                   sock: socket.socket | None = None) -> tuple[_Listener, tuple[str, int]]:
        assert sock is None, "workers need the fleet front"
        TCPListener.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        srv = self._start(TCPListener(address, Handler), tls=tls)
        addr = srv.server_address
        assert isinstance(addr, tuple)  # an AF_INET/AF_INET6 listener
        return srv, (addr[0], addr[1])

    def stop_listener(self, srv: _Listener) -> None:
        if srv in self._listeners:
            self._listeners.remove(srv)
        srv.close()

    def drain(self, timeout: float) -> None:
        """Stop accepting; let requests in flight finish (bounded)."""
        stoppers = [threading.Thread(target=srv.close) for srv in self._listeners]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self._listeners.clear()
        deadline = time.monotonic() + timeout
        while self.slots.total and time.monotonic() < deadline:
            time.sleep(0.02)
