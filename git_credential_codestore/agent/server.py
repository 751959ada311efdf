"""The agent daemon: holds the org key and mints tokens over HTTP on local sockets.

Listeners, and who may use each (the security model in one table):

    owner socket   <runtime>/codestore/agent.sock, dir 0700, socket 0600, peer uid
                   checked with SO_PEERCRED. The owner (same uid, no grant) may mint
                   what its own key could and make admin calls; a grant holder (the
                   same uid or root, e.g. a container running as root) is clamped to
                   its grant and may not make admin calls.
    grant socket   <runtime>/codestore/grant-<id>.sock, created by `grant create
                   --own-socket`: every request on it is that grant's (no secret
                   needed), so mounting the socket into a container *is* the grant and
                   the container cannot reach the owner socket at all.
    --listen       HTTP(S) for sandboxes on other machines: grant requests only; TLS
                   required unless bound to loopback.

Routes (anchored; anything else is 404):

    GET  /v1/ping                       anyone who can connect
    POST /v1/token                      owner or grant holder
    GET  /v1/status, GET/POST /v1/grants, POST /v1/grants/<id>/revoke, POST /v1/shutdown
                                        owner only (owner socket, owner uid, no grant)

Robustness: a thread per connection, at most MAX_CONNECTIONS at once; a read timeout
per operation and a whole-connection deadline enforced by a reaper thread (slow
clients cannot hold a thread for long); request bodies capped at MAX_BODY; any bug in a
request is a 500 for that request only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TextIO, TypeVar

from .. import tokens
from ..config import Config
from ..errors import CodestoreError, ConfigError, ProtocolError, redact
from ..vocab import check_ttl, is_loopback, parse_scopes, ref_policy
from . import policy, wire
from .audit import AuditLog
from .client import key_identity
from .discovery import default_socket, grant_socket, unix_address
from .grants import Grant, GrantStore, grant_id_of

MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 256
IO_TIMEOUT = 5.0  # per read or write
CONNECTION_DEADLINE = 15.0  # a whole request, however slowly it trickles in


def default_state_dir() -> str:
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("codestore"), "agent")


@dataclass(frozen=True)
class Caller:
    transport: str  # "socket" (owner socket) | "grant-socket" | "tcp"
    uid: int | None
    peer: str
    bound_grant: str | None = None


class Agent:
    """Request handling, independent of the wire: (caller, method, path, body) -> reply."""

    def __init__(self, cfg: Config, key: tokens.PrivateKey, key_where: str, key_id: str, store: GrantStore, audit: AuditLog) -> None:
        self.cfg = cfg
        self.org = cfg.require_org()
        self.key = key
        self.key_where = key_where
        self.key_id = key_id
        self.store = store
        self.audit = audit
        self.owner_uid = os.getuid()
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.socket_path = ""
        self.listen_url = ""
        self.stop = threading.Event()
        # Set by the daemon: open or close a grant's dedicated socket.
        self.on_grant_created: Callable[[Grant], str | None] = lambda g: None
        self.on_grant_revoked: Callable[[Grant], None] = lambda g: None
        self.grant_socket_path: Callable[[str], str] = lambda gid: ""

    # -- the router -------------------------------------------------------------------

    _ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
        ("GET", re.compile(r"/v1/ping"), "ping"),
        ("POST", re.compile(r"/v1/token"), "token"),
        ("GET", re.compile(r"/v1/status"), "status"),
        ("GET", re.compile(r"/v1/grants"), "list_grants"),
        ("POST", re.compile(r"/v1/grants"), "create_grant"),
        ("POST", re.compile(r"/v1/grants/([0-9a-f]{1,32})/revoke"), "revoke_grant"),
        ("POST", re.compile(r"/v1/shutdown"), "shutdown"),
    )
    _ADMIN = frozenset({"status", "list_grants", "create_grant", "revoke_grant", "shutdown"})

    def dispatch(self, caller: Caller, method: str, path: str, authorization: str | None, body: bytes) -> tuple[int, dict[str, object]]:
        self.last_activity = time.monotonic()
        for m, pattern, name in self._ROUTES:  # noqa: B007 - the route found is used after the break
            match = pattern.fullmatch(path)
            if match and m == method:
                break
        else:
            return 404, {"error": f"no such agent endpoint {method} {path[:60]}"}
        if name in self._ADMIN:
            if caller.transport != "socket" or authorization is not None or caller.uid != self.owner_uid:
                # A grant holder must never create grants (it would widen its own).
                self.audit.record("refuse", {"action": name, "peer": caller.peer, "via": caller.transport, "reason": "admin call from a non-owner"})
                return 403, {"error": "administrative calls are accepted only from the owner on the agent's own socket, without a grant"}
        if name == "token":
            return self.mint(caller, authorization, body)  # lines, not JSON (wire.py)
        try:
            data = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "request body is not JSON"}
        if name == "ping":
            return 200, {"ok": True, "agent": "codestore"}
        if name == "status":
            return 200, self.status()
        if name == "list_grants":
            return 200, {"grants": [g.public() for g in self.store.all()]}
        if name == "create_grant":
            return self.create_grant(data)
        if name == "revoke_grant":
            return self.revoke_grant(match.group(1))
        self.stop.set()
        return 200, {"ok": True, "pid": os.getpid()}

    # -- minting ----------------------------------------------------------------------

    def _grant_for(self, caller: Caller, authorization: str | None) -> tuple[Grant | None, str | None]:
        """(grant, None) for a grant holder, (None, None) for the owner, or (None, reason)."""
        secret = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme != "Grant" or not value.strip():
                return None, "the Authorization header must be `Grant <secret>`"
            secret = value.strip()
        if caller.bound_grant is not None:
            grant = self.store.get(caller.bound_grant)
            if grant is None:
                return None, "this grant socket's grant no longer exists"
            if secret is not None and self.store.authenticate(secret) is not grant:
                return None, "the presented grant is not this socket's grant"
            return grant, None
        if secret is not None:
            grant = self.store.authenticate(secret)
            if grant is None:
                return None, "unknown grant (mistyped, or created by another agent)"
            return grant, None
        if caller.transport == "tcp":
            return None, "a grant is required over the network; set CODESTORE_GRANT or CODESTORE_GRANT_FILE"
        if caller.uid != self.owner_uid:
            return None, f"peer uid {caller.uid} is not the agent's owner; present a grant"
        return None, None

    def mint(self, caller: Caller, authorization: str | None, body: bytes) -> tuple[int, dict[str, object]]:
        try:
            request, owner = wire.decode_request(body)
        except ProtocolError as e:
            return 400, {"error": f"bad token request: {e}"}
        data = {"repo": request.repo, "scopes": list(request.scopes), "ttl": request.ttl, "ephemeral": request.ephemeral}
        grant, reason = self._grant_for(caller, authorization)
        who: dict[str, object] = {"grant": grant.id if grant else None, "via": caller.transport, "peer": caller.peer}
        if reason is not None:
            secret = (authorization or "").partition(" ")[2].strip()
            who["grant"] = grant_id_of(secret)  # the id a presented secret claims, never the secret
            return self._refuse(who, data, reason, 401)
        try:
            req = policy.check_request(request)
        except policy.Refused as e:
            return self._refuse(who, data, e.reason, e.status, grant)
        try:
            if grant is not None:
                decision = policy.clamp_to_grant(grant, req, self.cfg.ttl)
            else:
                sub = self._check_owner(owner or None)
                decision = policy.clamp_for_owner(req, self.cfg.ttl, sub)
        except policy.Refused as e:
            return self._refuse(who, data, e.reason, e.status, grant)
        try:
            token = tokens.mint(
                self.key, org=self.org, repo=decision.repo, scopes=decision.scopes, ttl=decision.ttl,
                sub=decision.sub, kid=self.cfg.kid, refs=decision.refs or None,
            )
        except CodestoreError as e:
            return self._refuse(who, data, str(e), 400, grant)
        if grant is not None:
            self.store.record_use(grant, ok=True)
        self.audit.record("mint", {
            **who, "sub": decision.sub, "repo": decision.repo, "ephemeral": req.ephemeral,
            "scopes": list(decision.scopes), "ttl": decision.ttl, "refs": decision.refs or None,
            "purpose": req.purpose, "result": "ok",
        })
        return 200, {"token": token.reveal(), "expires_at": token.expires_at, "ttl": decision.ttl, "scopes": list(decision.scopes), "sub": decision.sub}

    def _check_owner(self, owner: object) -> str:
        """The owner's helper must be configured for the key and org this agent holds."""
        if not isinstance(owner, dict):
            return self.cfg.sub
        mine = {"org": self.org, "kid": self.cfg.kid, "key": self.key_id}
        for field_name, value in mine.items():
            if owner.get(field_name) != value:
                raise policy.Refused(
                    409,
                    f"signs for org {self.org!r} with kid {self.cfg.kid!r} ({self.key_where}); "
                    f"this helper is configured differently ({field_name}); restart the agent with the same settings",
                )
        sub = owner.get("sub")
        return sub if isinstance(sub, str) and 0 < len(sub) <= 200 else self.cfg.sub

    def _refuse(self, who: Mapping[str, object], data: object, reason: str, status: int, grant: Grant | None = None) -> tuple[int, dict[str, object]]:
        d = data if isinstance(data, dict) else {}
        fields: dict[str, object] = dict(who)
        fields["sub"] = grant.sub if grant else None
        for k in ("repo", "scopes", "ttl", "ephemeral"):
            v = d.get(k)
            # Only well-formed values reach the log: a hostile caller cannot inject lines.
            if isinstance(v, (str, int, bool)) and not (isinstance(v, str) and len(v) > 200):
                fields[k] = v
            elif isinstance(v, list) and all(isinstance(s, str) and len(s) < 40 for s in v) and len(v) < 10:
                fields[k] = v
        fields["result"] = "refused"
        fields["reason"] = reason
        if grant is not None:
            self.store.record_use(grant, ok=False)
        self.audit.record("refuse", fields)
        code = "mismatch" if status == 409 else "refused"
        return status, {"error": reason, "code": code}

    # -- administration ---------------------------------------------------------------

    def create_grant(self, data: object) -> tuple[int, dict[str, object]]:
        if not isinstance(data, dict):
            return 400, {"error": "grant request must be a JSON object"}
        try:
            repos = data.get("repos")
            if not isinstance(repos, list) or not repos or not all(isinstance(r, str) and r.strip() for r in repos):
                raise ConfigError("a grant needs --repo (a repository id or glob such as team/*)")
            scopes = parse_scopes(data.get("scopes") or "git:read", "--scopes")
            max_ttl = data.get("max_ttl", 900)
            if not isinstance(max_ttl, int):
                raise ConfigError(f"--max-ttl must be a whole number of seconds, not {max_ttl!r}")
            check_ttl(max_ttl, "--max-ttl")
            expires_in = data.get("expires_in")
            if expires_in is not None and (not isinstance(expires_in, int) or expires_in <= 0):
                raise ConfigError("--expires-in must be a positive duration")
            refs = ref_policy(data.get("refs") or [])
            sub = data.get("sub")
            if sub is not None and (not isinstance(sub, str) or not 0 < len(sub) <= 200):
                raise ConfigError("--sub must be a short identifier")
        except CodestoreError as e:
            return 400, {"error": str(e)}
        grant, secret = self.store.create(
            repos=repos, scopes=scopes, max_ttl=max_ttl, sub=sub,
            expires_at=int(time.time()) + expires_in if expires_in else None,
            ephemeral_only=bool(data.get("ephemeral_only")), refs=[[p, ops] for p, ops in refs],
            own_socket=bool(data.get("own_socket")),
        )
        sock = self.on_grant_created(grant) if grant.own_socket else None
        self.audit.record("grant-create", {"grant": grant.id, "sub": grant.sub, "repos": grant.repos, "scopes": grant.scopes,
                                           "max_ttl": grant.max_ttl, "expires_at": grant.expires_at,
                                           "ephemeral_only": grant.ephemeral_only, "refs": grant.refs or None})
        reply = grant.public()
        reply["grant"] = secret.reveal()
        reply["socket"] = sock
        return 201, reply

    def revoke_grant(self, gid: str) -> tuple[int, dict[str, object]]:
        grant = self.store.revoke(gid)
        if grant is None:
            return 404, {"error": f"no grant {gid}; see: codestore grant list"}
        self.on_grant_revoked(grant)
        self.audit.record("grant-revoke", {"grant": grant.id, "sub": grant.sub})
        return 200, grant.public()

    def status(self) -> dict[str, object]:
        states: dict[str, int] = {"active": 0, "revoked": 0, "expired": 0}
        for g in self.store.all():
            states[g.state()] += 1
        return {
            "pid": os.getpid(), "socket": self.socket_path, "listen": self.listen_url or None,
            "org": self.org, "kid": self.cfg.kid, "key": self.key_where,
            "state_dir": self.store.state_dir, "audit_log": self.audit.path,
            "uptime": int(time.time() - self.started), "grants": states,
            "mints": self.audit.counts.get("mint", 0), "refusals": self.audit.counts.get("refuse", 0),
        }


# -- the wire ---------------------------------------------------------------------------


class Reaper:
    """Cuts connections that outlive CONNECTION_DEADLINE (slowloris), one thread for all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: dict[int, tuple[socket.socket, float]] = {}
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks[id(sock)] = (sock, time.monotonic() + CONNECTION_DEADLINE)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.pop(id(sock), None)

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                late = [s for s, deadline in self._socks.values() if deadline < now]
                for s in late:
                    self._socks.pop(id(s), None)
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED, BSD/macOS LOCAL_PEERCRED)."""
    if hasattr(socket, "SO_PEERCRED"):
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid
    if hasattr(socket, "LOCAL_PEERCRED"):  # pragma: no cover - macOS
        raw = sock.getsockopt(0, socket.LOCAL_PEERCRED, struct.calcsize("2I"))
        return struct.unpack("2I", raw[:8])[1]
    return None  # pragma: no cover - unknown platform: treated as not the owner


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "codestore-agent"
    sys_version = ""
    timeout = IO_TIMEOUT
    server: _Listener

    def setup(self) -> None:
        self.server.reaper.watch(self.request)
        if self.server.tls is not None:
            self.request.settimeout(IO_TIMEOUT)
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    unread = False  # the reply went out before the request was read in full

    def finish(self) -> None:
        try:
            super().finish()
            if self.unread:
                self._linger()
        finally:
            self.server.reaper.forget(self.request)

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
        self.caller = self.server.identify(self.request, self.client_address)
        if self.caller.transport != "tcp":
            allowed = {self.server.agent.owner_uid, 0}  # root can read our memory anyway
            if self.caller.uid not in allowed:
                self.unread = True
                self.server.agent.audit.record(
                    "refuse",
                    {"via": self.caller.transport, "peer": self.caller.peer, "result": "refused",
                     "reason": "peer uid is not the owner"},
                )
                self._reply(403, {"error": f"peer uid {self.caller.uid} may not use this agent (owner uid {self.server.agent.owner_uid})"})
                return
        try:
            self.handle_one_request()
        except (OSError, ssl.SSLError):
            pass  # the client went away or timed out; nothing to answer

    def _serve(self) -> None:
        self.unread = True
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, {"error": "send a Content-Length, not chunked encoding"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(400, {"error": "bad Content-Length"})
            return
        if length > MAX_BODY:
            self._reply(413, {"error": f"request body over {MAX_BODY} bytes"})
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            return  # the client hung up mid-body
        self.unread = False
        # POST /v1/token speaks lines both ways (wire.py); every other endpoint JSON.
        lines = (self.command, self.path) == ("POST", "/v1/token")
        if not lines and (self.headers.get("Content-Type") or "").split(";")[0].strip() == wire.CONTENT_TYPE:
            self._reply(415, {"error": f"{wire.CONTENT_TYPE} is accepted only by POST /v1/token"})
            return
        try:
            status, reply = self.server.agent.dispatch(self.caller, self.command, self.path, self.headers.get("Authorization"), body)
        except Exception as e:  # noqa: BLE001 - one request's bug must not take down the agent
            print(f"codestore agent: internal error on {self.command} {self.path[:60]}: {redact(repr(e))}", file=sys.stderr, flush=True)
            status, reply = 500, {"error": f"internal error in the agent ({type(e).__name__}); see its log"}
        self._reply(status, reply, lines=lines)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def _reply(self, status: int, reply: Mapping[str, object], lines: bool = False) -> None:
        data = wire.encode_reply(reply) if lines else json.dumps(reply).encode()
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", wire.CONTENT_TYPE if lines else "application/json")
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
        self.request_version = self.protocol_version  # no HTTP/0.9 replies without a status
        self._reply(code, {"error": f"bad request ({message or code})"})

    def log_message(self, format: str, *args: object) -> None:
        pass  # the audit log is the record; request lines could carry a mistaken secret


class _Listener(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """Shared by the Unix and TCP listeners: thread per connection, bounded."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # bursts of helpers (the kernel caps it at somaxconn)
    agent: Agent
    reaper: Reaper
    tls: ssl.SSLContext | None = None
    transport = "socket"
    bound_grant: str | None = None
    slots: threading.BoundedSemaphore

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
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
            self.slots.release()

    def identify(self, sock: socket.socket, address: object) -> Caller:
        if self.transport == "tcp":
            host = address[0] if isinstance(address, tuple) else str(address)
            return Caller("tcp", None, str(host))
        uid = peer_uid(sock)
        return Caller(self.transport, uid, f"uid:{uid}", self.bound_grant)

    def handle_error(self, request: object, client_address: object) -> None:
        print(f"codestore agent: connection error: {redact(repr(sys.exc_info()[1]))}", file=sys.stderr, flush=True)


class UnixListener(_Listener, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        addr, fd = unix_address(self.server_address)  # type: ignore[arg-type]
        try:
            self.socket.bind(addr)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.server_address, 0o600)  # type: ignore[arg-type]
        self.inode = os.stat(self.server_address).st_ino  # type: ignore[arg-type]


class TCPListener(_Listener, socketserver.TCPServer):
    allow_reuse_address = True
    transport = "tcp"


_L = TypeVar("_L", bound=_Listener)


def _new(cls: type[_L], agent: Agent, reaper: Reaper, address: str | tuple[str, int], **attrs: object) -> _L:
    srv = cls(address, Handler)
    srv.agent, srv.reaper, srv.slots = agent, reaper, threading.BoundedSemaphore(MAX_CONNECTIONS)
    for k, v in attrs.items():
        setattr(srv, k, v)
    return srv


def prepare_socket_dir(path: str, is_default: bool) -> None:
    """0700 directory; a stale socket (nothing listening) is removed, a live one refused."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if is_default:
        os.chmod(d, 0o700)
    elif st.st_mode & 0o077:
        raise ConfigError(f"{d} is open to other users (mode {st.st_mode & 0o777:o}); put the socket in a private 0700 directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{d} belongs to uid {st.st_uid}, not you; put the socket in a directory you own")
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        addr, fd = unix_address(path)
        try:
            probe.connect(addr)
        except OSError:
            os.unlink(path)  # stale: left by an agent that died
        else:
            raise ConfigError(f"an agent is already running at {path}; stop it with: codestore agent stop")
        finally:
            probe.close()
            if fd is not None:
                os.close(fd)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen wants HOST:PORT (e.g. 127.0.0.1:8765), not {value!r}")
    return host, int(port)


def _close_all(started: list[_Listener], sockets: list[_Listener], store: GrantStore, audit: AuditLog) -> None:
    # In parallel: each serve_forever notices only at its next poll.
    stoppers = [threading.Thread(target=srv.shutdown) for srv in started]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    for srv in started:
        srv.server_close()
    for srv in sockets:
        try:
            # Only our own socket: a newer agent may have taken the path over.
            if os.stat(srv.server_address).st_ino == srv.inode:  # type: ignore[arg-type, attr-defined]
                os.unlink(srv.server_address)  # type: ignore[arg-type]
        except OSError:
            pass
    store.close()
    audit.close()


def serve(
    cfg: Config,
    env: Mapping[str, str],
    *,
    socket_path: str | None = None,
    listen: str | None = None,
    audit_path: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    idle_timeout: float = 0,
    state_dir: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT, `agent stop` or idle timeout."""
    from .. import keys

    os.umask(0o077)  # everything the agent creates is private to its owner
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tcp_address = parse_listen(listen) if listen else None
    if tcp_address and not tls_cert and not is_loopback(tcp_address[0]):
        raise ConfigError(
            f"refusing to serve grants over plain HTTP on {tcp_address[0]}: pass --tls-cert/--tls-key, "
            "or listen on 127.0.0.1 behind a TLS tunnel"
        )
    cfg.require_org()
    key, where = keys.load_private_key(cfg, env)
    state_dir = state_dir or default_state_dir()
    is_default = socket_path is None
    socket_path = os.path.abspath(socket_path or default_socket(env))
    prepare_socket_dir(socket_path, is_default)
    tls = None
    if tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the TLS certificate/key ({type(e).__name__}); check --tls-cert and --tls-key") from None

    store = GrantStore(state_dir).open()
    audit = AuditLog(audit_path or os.path.join(state_dir, "audit.log"))
    agent = Agent(cfg, key, where, key_identity(cfg, env), store, audit)
    agent.socket_path = socket_path
    reaper = Reaper()
    grant_listeners: dict[str, UnixListener] = {}
    lock = threading.Lock()

    def grant_socket_path(gid: str) -> str:
        return grant_socket(socket_path, gid)

    def open_grant_socket(grant: Grant) -> str | None:
        path = grant_socket_path(grant.id)
        with lock:
            if grant.id in grant_listeners:
                return path
            if os.path.lexists(path):
                os.unlink(path)
            srv = _new(UnixListener, agent, reaper, path, transport="grant-socket", bound_grant=grant.id)
            grant_listeners[grant.id] = srv
        start(srv)
        return path

    def close_grant_socket(grant: Grant) -> None:
        with lock:
            srv = grant_listeners.pop(grant.id, None)
        if srv is not None:
            started.remove(srv)
            srv.shutdown()
            srv.server_close()
            try:
                os.unlink(srv.server_address)  # type: ignore[arg-type]
            except OSError:
                pass

    agent.on_grant_created = open_grant_socket
    agent.on_grant_revoked = close_grant_socket
    agent.grant_socket_path = grant_socket_path

    started: list[_Listener] = []

    def start(srv: _Listener) -> None:
        started.append(srv)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.25}, daemon=True).start()

    main = _new(UnixListener, agent, reaper, socket_path)
    start(main)
    try:
        if tcp_address:
            TCPListener.address_family = socket.AF_INET6 if ":" in tcp_address[0] else socket.AF_INET
            try:
                tcp = _new(TCPListener, agent, reaper, tcp_address, tls=tls)
            except OSError as e:
                raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
            host, port = tcp.socket.getsockname()[:2]
            agent.listen_url = f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"
            start(tcp)
        for grant in store.all():
            if grant.own_socket and grant.state() == "active":
                open_grant_socket(grant)
    except BaseException:
        _close_all(started, [main, *grant_listeners.values()], store, audit)
        raise

    def on_signal(signum: int, frame: object) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    print(f"serving unix:{socket_path}", file=out)
    if agent.listen_url:
        print(f"serving {agent.listen_url}", file=out)
    print(f"ready pid={os.getpid()} org={agent.org} key={where} audit={audit.path}", file=out, flush=True)

    reason = "stopped"
    try:
        while not agent.stop.wait(1.0):
            store.flush()
            if idle_timeout and time.monotonic() - agent.last_activity > idle_timeout:
                reason = f"idle for {int(idle_timeout)}s"
                break
            try:
                if os.stat(socket_path).st_ino != main.inode:
                    reason = "socket replaced"
                    break
            except FileNotFoundError:
                reason = "socket removed"  # its directory was cleaned up: nobody can reach us
                break
    finally:
        _close_all(started, [main, *grant_listeners.values()], store, audit)
    print(f"codestore agent exiting: {reason}", file=sys.stderr, flush=True)
    return 0
