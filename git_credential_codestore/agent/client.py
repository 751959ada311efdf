"""Talking to the agent: the token source helpers use, and the admin calls the CLI makes.

Where the agent is (its address, the grant, the sockets) is `discovery.py`'s business.
Helpers run this on every git fetch and push, so it speaks a small subset of HTTP/1.1 by
hand (`http.client` alone costs more start-up time than the whole round trip to the
agent), mints in the JSON-free line format of `wire.py`, and reaches a Unix socket
through the C-level `_socket`: `json` and `socket` (with `re` and `enum` behind them) are
imported only for admin calls and agents over TCP, `ssl` only for https. One request
per connection, `Connection: close`.

The grant travels in the `Authorization: Grant ...` header, never in a URL or argv.
Every failure is one line that says what to do; nothing here can hang git: every
exchange has one total deadline (connect, TLS handshake, request and reply together).
"""

from __future__ import annotations

import _socket
import os
import time

from ..config import Config, getenv
from ..errors import ConfigError, PolicyError, ProtocolError, RemoteError
from ..secrets import Secret, Token
from ..vocab import TokenRequest
from . import wire
from .discovery import Endpoint, ca_file, endpoints_from_env, key_uri, read_grant, unix_address
from .workload import WorkloadIdentity, find_identity

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Iterator, Mapping

MAX_REPLY = 1 << 20
CONNECT_TIMEOUT = 2.0
FAILOVER_CONNECT_TIMEOUT = 0.5  # per replica when CODESTORE_AGENT_URL names several
REPLY_TIMEOUT = 15.0
FAILOVER_REPLY_TIMEOUT = 3.0  # a replica that accepts but does not answer (stopped, wedged), when another is left to ask
def start_hint(ep: Endpoint) -> str:
    """What to do when nothing answers at `ep`, naming the setting it came from (an admin
    command's socket is never CODESTORE_AGENT_URL's)."""
    if ep.kind == "unix":
        return "start it where the key lives (codestore agent start), or point CODESTORE_AGENT_SOCK (or --socket) at its socket"
    return "start it where the key lives (codestore agent start), or fix CODESTORE_AGENT_URL"


def replica_timeouts(i: int, n: int, deadline: float) -> tuple[float, float] | None:
    """(connect, reply) timeouts for the i-th of n replicas asked in turn: short while another
    is left to ask, the whole deadline for the last (and for an only one); each cut to what
    is left of `deadline` (time.monotonic(): REPLY_TIMEOUT from the first ask, so a list of
    silent replicas costs no more than one silent agent), None when nothing is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    connect = CONNECT_TIMEOUT if n == 1 else FAILOVER_CONNECT_TIMEOUT
    return min(connect, left), min(REPLY_TIMEOUT if i == n - 1 else FAILOVER_REPLY_TIMEOUT, left)


class Failover:
    """The replicas asked in turn under one deadline (REPLY_TIMEOUT from the first ask),
    each with replica_timeouts' timeouts: iterate for (endpoint, connect, reply), and when
    none gave an answer, `none_answered` is the one line that says so. The token requests
    (AgentSource._ask) and the JSON calls (call_any) walk the replicas through it, so both
    fail over, give up and say so alike; each decides which answers end the walk."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self.asked = 0

    def __iter__(self) -> Iterator[tuple[Endpoint, float, float]]:
        deadline = time.monotonic() + REPLY_TIMEOUT
        for i, ep in enumerate(self.endpoints):
            timeouts = replica_timeouts(i, len(self.endpoints), deadline)
            if timeouts is None:
                return
            self.asked = i + 1
            yield ep, *timeouts

    def none_answered(self, first: AgentUnavailable | None) -> AgentUnavailable:
        """No replica answered: the replicas asked, those time left out, and the first one's
        reason (an only replica's own line, as it is)."""
        if len(self.endpoints) == 1 and first is not None:
            return first
        tried = ", ".join(map(str, self.endpoints[:self.asked]))
        left = self.endpoints[self.asked:]
        skipped = f" ({', '.join(map(str, left))} not asked: {REPLY_TIMEOUT:.0f}s had passed)" if left else ""
        why = f"the first: {first}" if first is not None else start_hint(self.endpoints[0])
        return AgentUnavailable(f"no codestore agent answered at any of {tried}{skipped}; {why}")


class AgentUnavailable(RemoteError):
    """Nothing answers at the agent's address."""


class AgentSilent(AgentUnavailable):
    """The agent accepted the request and did not answer in time (stopped, wedged, overloaded)."""


class AgentMismatch(RemoteError):
    """The agent signs for another org or key than this helper is configured for."""


class AgentRefused(PolicyError):
    """The agent answered and refused (beyond the grant, revoked grant, bad request)."""


def key_identity(cfg: Config, env: Mapping[str, str]) -> str:
    """Which key the configuration names, without reading it (no crypto here).

    The agent compares this with its own, so a helper never gets a token signed with a
    key other than the one its configuration chose.
    """
    if not cfg.uses_env:
        env = {}  # as keys.sources: an [orgs.*] section uses its own key
    uri = key_uri(env)
    if uri.startswith("pkcs11:"):
        return "pkcs11:" + uri[len("pkcs11:"):].split("?", 1)[0]  # a token's key: never its module or PIN file
    pem = getenv(env, "CODESTORE_PRIVATE_KEY")
    if pem.strip():
        import hashlib

        return "pem:" + hashlib.sha256(pem.encode()).hexdigest()[:16]
    path = getenv(env, "CODESTORE_PRIVATE_KEY_FILE") or cfg.private_key_file
    if path:
        return "file:" + os.path.realpath(os.path.expanduser(path))
    return "store:" + (cfg.org or "default")


def _connect_unix(sock: _socket.socket, addr: str, timeout: float) -> None:
    """connect(), retrying while the agent's backlog is full (EAGAIN on a Unix socket)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(addr)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _connect(ep: Endpoint, timeout: float, env: Mapping[str, str], deadline: float) -> _socket.socket | socket.socket:
    ctx = _tls_context(env) if ep.kind == "https" else None  # a bad CODESTORE_AGENT_CA is known before any connect
    try:
        if ep.kind == "unix":
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                with unix_address(ep.address) as addr:
                    _connect_unix(sock, addr, timeout)
            except OSError:
                sock.close()
                raise
            return sock
        import socket

        sock = socket.create_connection((ep.address, ep.port), timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise AgentUnavailable(f"no codestore agent at {ep} ({e.strerror or type(e).__name__}); {start_hint(ep)}") from None
    except OSError as e:
        raise AgentUnavailable(f"cannot reach the codestore agent at {ep} ({e.strerror or type(e).__name__}); {start_hint(ep)}") from None
    except UnicodeError:  # a name IDNA cannot encode (from_url refuses them; an endpoint made elsewhere may not)
        raise AgentUnavailable(f"cannot reach the codestore agent at {ep} (not a valid host name); {start_hint(ep)}") from None
    if ctx is not None:
        import ssl

        try:
            sock = ctx.wrap_socket(sock, server_hostname=ep.address, do_handshake_on_connect=False)
            _handshake(sock, deadline)
        except TimeoutError:
            sock.close()
            raise AgentUnavailable(f"TLS with the codestore agent at {ep} did not finish in time; check: codestore agent status") from None
        except (ssl.SSLError, OSError) as e:
            sock.close()
            raise AgentUnavailable(f"TLS with the codestore agent at {ep} failed ({type(e).__name__}); set CODESTORE_AGENT_CA to its CA file") from None
    return sock


def _tls_context(env: Mapping[str, str]) -> ssl.SSLContext:
    """The client context for an https agent: the system's CAs, or CODESTORE_AGENT_CA's, read
    as every file codestore is pointed at is (bounded, a pipe never waited on forever).
    AgentUnavailable (in one line) when that file will not do: the next replica may be http."""
    import ssl

    from ..files import ca_context

    path = ca_file(env)
    try:
        return ca_context(path and os.path.expanduser(path), "CODESTORE_AGENT_CA")
    except (OSError, UnicodeDecodeError, ValueError, ssl.SSLError, ConfigError) as e:
        why = getattr(e, "strerror", None) or (str(e) if isinstance(e, ConfigError) else "empty" if str(e) == "empty" else "not PEM certificates")
        raise AgentUnavailable(f"cannot use CODESTORE_AGENT_CA {path} ({why}); point it at the agent's CA certificate (PEM)") from None


def _handshake(sock: ssl.SSLSocket, deadline: float) -> None:
    """The TLS handshake within the exchange's deadline (a dripping peer cannot stretch it)."""
    import select
    import ssl

    sock.setblocking(False)
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                want: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([sock], [])
            except ssl.SSLWantWriteError:
                want = ([], [sock])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*want, [], left)[:2]):
                raise TimeoutError
    finally:
        sock.setblocking(True)


def exchange(
    ep: Endpoint,
    method: str,
    path: str,
    payload: bytes,
    content_type: str | None,
    *,
    grant: Secret | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = REPLY_TIMEOUT,
    identity: Secret | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection; returns (status, body). Raises AgentUnavailable."""
    env = os.environ if env is None else env
    host = "agent" if ep.kind == "unix" else f"{ep.address}:{ep.port}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(payload)}"]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    if grant is not None:
        head.append(f"Authorization: Grant {grant.reveal()}")
    elif identity is not None:  # a workload identity token (workload.py), for the agent alone
        head.append(f"Authorization: Identity {identity.reveal()}")
    if any(c in line for line in head for c in "\r\n\0"):
        # A value with a line break would add header lines of its choosing (read_grant and
        # workload.py refuse such values first, with the fix; this holds for every caller).
        raise ConfigError(f"refusing to send a request to the codestore agent at {ep} with a line break in a header; "
                          "check CODESTORE_GRANT/CODESTORE_GRANT_FILE and the workload identity token")
    # One deadline for the whole exchange: a peer dripping a byte at a time must not
    # restart a per-read timeout (each recv waits at most what is left).
    deadline = time.monotonic() + timeout
    sock = _connect(ep, min(timeout, connect_timeout), env, deadline)
    chunks, size = [], 0
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise RemoteError(f"the codestore agent at {ep} sent an oversized reply")
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        raise AgentSilent(f"the codestore agent at {ep} did not answer within {timeout:.0f}s; check: codestore agent status") from None
    except OSError as e:
        raise AgentUnavailable(f"the codestore agent at {ep} dropped the connection ({e.strerror or type(e).__name__}); {start_hint(ep)}") from None
    finally:
        sock.close()
    if not chunks:
        # Closed with the request in hand and no answer at all: the agent died or was
        # stopped mid-request (a replica SIGKILLed under load). Unavailable, like a refused
        # connect, so a helper with several replicas asks the next one.
        raise AgentUnavailable(f"the codestore agent at {ep} closed the connection without answering; {start_hint(ep)}")
    return parse_reply(b"".join(chunks), ep)


def parse_reply(raw: bytes, ep: Endpoint) -> tuple[int, bytes]:
    """(status, body) of an HTTP/1.x reply read to its end; RemoteError if it is not one, or
    if it ended before the length it announced (a replica killed mid-reply, a proxy's cut)."""
    header, _, content = raw.partition(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    status_line = lines[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not (
        len(status_line[1]) == 3 and status_line[1].isdigit()
    ):
        raise RemoteError(f"the codestore agent at {ep} sent a reply that is not HTTP; is it a codestore agent?")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            announced = value.strip()
            if not announced.isdigit() or int(announced) != len(content):
                raise RemoteError(f"the codestore agent at {ep} sent a reply cut short (or longer than it said)")
    return int(status_line[1]), content


def call(
    ep: Endpoint,
    method: str,
    path: str,
    body: Mapping[str, object] | None = None,
    *,
    grant: Secret | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = REPLY_TIMEOUT,
    identity: Secret | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[int, dict[str, object]]:
    """One JSON request (admin calls, ping, audit reports); returns (HTTP status, JSON object)."""
    import json

    payload = json.dumps(body).encode() if body is not None else b""
    status, content = exchange(ep, method, path, payload, "application/json" if body is not None else None,
                               grant=grant, env=env, timeout=timeout, identity=identity, connect_timeout=connect_timeout)
    from .. import jsontext

    try:
        reply = jsontext.loads(content) if content else {}
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        if status >= 400:
            return status, {}  # a proxy's or load balancer's error page: `refusal` says its status
        raise RemoteError(f"the codestore agent at {ep} sent a reply that is not {'JSON' if reply is None else 'a JSON object'}; "
                          "is it a codestore agent?")
    return status, reply


def call_any(endpoints: list[Endpoint], method: str, path: str, body: Mapping[str, object] | None = None, *,
             grant: Secret | None = None, env: Mapping[str, str] | None = None) -> tuple[Endpoint, int, dict[str, object]]:
    """`call` of a request that changes nothing (a ping, a query) on the replicas in turn, as
    helpers ask for tokens (AgentSource._ask): the first answer of the agent's own ends the
    walk (a success, or a 4xx with its reason: every replica would give it). A replica's own
    trouble (a 5xx) or an answer that is not the agent's (not HTTP or not JSON, cut short, a
    proxy's page or redirect) is passed over for the next. With none left: the first answer
    passed over (RemoteError for one that was not JSON), else AgentUnavailable; the replicas'
    timeouts as replica_timeouts gives them."""
    walk = Failover(endpoints)
    passed: tuple[Endpoint, int, dict[str, object]] | RemoteError | None = None
    unreachable: AgentUnavailable | None = None
    for ep, connect, reply in walk:
        try:
            status, data = call(ep, method, path, body, grant=grant, env=env, timeout=reply, connect_timeout=connect)
        except AgentUnavailable as e:
            unreachable = unreachable or e
            continue
        except RemoteError as e:
            passed = passed or e
            continue
        if status < 300 or (status < 500 and data.get("error")):
            return ep, status, data
        passed = passed or (ep, status, data)
    if isinstance(passed, RemoteError):
        raise passed
    if passed is not None:
        return passed
    raise walk.none_answered(unreachable)


def refusal(ep: Endpoint, status: int, reply: Mapping[str, object]) -> Exception:
    if not reply.get("error"):  # not one of the agent's own refusals: a proxy's, or a front's "503 Busy"
        return AgentRefused(f"the codestore agent at {ep} answered HTTP {status} and said no more"
                            f"{'; it may be busy: try again' if status == 503 else ''}; check: codestore agent status")
    reason = str(reply.get("error"))
    if reply.get("code") == "mismatch":
        return AgentMismatch(f"the codestore agent at {ep} {reason}")
    return AgentRefused(f"the codestore agent refused: {reason}")


class AgentSource:
    """Tokens from an agent: with a grant (a sandbox) or as the owner (same uid, no grant)."""

    def __init__(self, endpoint: Endpoint | list[Endpoint], grant: Secret | None, cfg: Config, env: Mapping[str, str],
                 identity: WorkloadIdentity | None = None) -> None:
        # Several replicas: tried in order, each with a short connect timeout, so a dead one
        # costs a sandbox a refused connect (or FAILOVER_CONNECT_TIMEOUT), not a failed git.
        self.endpoints = endpoint if isinstance(endpoint, list) else [endpoint]
        self.endpoint = self.endpoints[0]
        self.grant = grant
        self.cfg = cfg
        self.env = env
        self.identity = identity  # used only without a grant
        self.reply_timeout = REPLY_TIMEOUT  # one replica's; shorter when the owner's local key can sign instead

    @classmethod
    def from_env(cls, cfg: Config, env: Mapping[str, str] | None = None) -> AgentSource:
        env = os.environ if env is None else env
        grant = read_grant(env)
        return cls(endpoints_from_env(env), grant, cfg, env, None if grant is not None else find_identity(env))

    def mint(self, request: TokenRequest) -> Token:
        owner = None
        identity = self.identity.token() if self.grant is None and self.identity is not None else None
        if self.grant is None and identity is None:
            # The owner signs as itself; the agent checks it holds the same key and org.
            owner = {
                "org": self.cfg.org,
                "kid": self.cfg.kid,
                "key": key_identity(self.cfg, self.env),
                "sub": self.cfg.sub,
            }
        try:
            body = wire.encode_request(request, owner)
        except ProtocolError as e:
            raise ConfigError(f"cannot ask the codestore agent for this token: {e}") from None
        from ..trace import say

        say(
            "agent-client",
            f"asking {self.endpoint} {'with a grant' if self.grant is not None else 'as the owner'} for "
            f"{request.repo}{' (+ephemeral)' if request.ephemeral else ''} {' '.join(request.scopes)}"
            f"{' (at most)' if getattr(request, 'narrow', False) else ''}",
            self.env,
        )
        token = self._ask(body, identity)
        del identity
        say("agent-client", f"got a token expiring at {token.expires_at} from {self.endpoint}", self.env)
        return token

    def own_grant(self) -> dict[str, object] | None:
        """The grant this caller holds, as the agent sees it (GET /v1/grant: nothing minted,
        nothing audited), or None for the owner; AgentRefused with the agent's reason."""
        ep, status, reply = call_any(self.endpoints, "GET", "/v1/grant", grant=self.grant, env=self.env)
        grant = reply.get("grant", False)
        if status != 200 or not (grant is None or isinstance(grant, dict)):
            raise refusal(ep, status, reply)
        self.endpoint = ep
        return grant

    def _token(self, ep: Endpoint, status: int, content: bytes) -> Token:
        """The token in one replica's answer, for the org git asked about; else why not."""
        from ..trace import say

        try:
            token = token_from_reply(status, content, ep)
        except AgentRefused as e:
            say("agent-client", f"refused by {ep} (HTTP {status}): {e}", self.env)
            if self.grant is None and self.identity is not None:
                raise AgentRefused(f"{e} (identity from {self.identity.where})") from None
            raise
        except (RemoteError, PolicyError) as e:
            say("agent-client", f"refused by {ep} (HTTP {status}): {e}", self.env)
            raise
        if self.cfg.org and not issued_by(token, self.cfg.org):
            # A sandbox's configuration can come from the URL git was given (no CODESTORE_ORG):
            # a token of the agent's org must not go to the host of another one.
            raise AgentMismatch(f"the codestore agent at {ep} mints for another org than {self.cfg.org!r}, "
                                f"whose host git asked for; use a URL of the agent's org, or set CODESTORE_ORG to it")
        return token

    def _ask(self, body: bytes, identity: Secret | None) -> Token:
        """The token from the first replica that gives one; `self.endpoint` is the replica that answered.

        Minting changes nothing, so every other outcome asks the next replica: a refused
        connection, silence (FAILOVER_REPLY_TIMEOUT but for the last), a 5xx, an answer that is
        not the agent's (not HTTP, cut short, a proxy's page or redirect, a token of another
        org). Only the agent's own refusal of the request (a 4xx with its reason) is final:
        every replica would give it. With none left, the line is the first answer's reason,
        else the first unreachable replica's.
        """
        if len(self.endpoints) == 1:
            status, content = exchange(self.endpoint, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=self.grant, env=self.env,
                                       identity=identity, timeout=self.reply_timeout)
            return self._token(self.endpoint, status, content)
        from ..trace import say

        walk = Failover(self.endpoints)
        answered: tuple[Endpoint, Exception] | None = None
        unreachable: AgentUnavailable | None = None
        for ep, connect, reply in walk:
            try:
                status, content = exchange(ep, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=self.grant, env=self.env,
                                           identity=identity, connect_timeout=connect, timeout=reply)
            except AgentUnavailable as e:
                say("agent-client", f"passing over {ep}: {e}", self.env)
                unreachable = unreachable or e
                continue
            except RemoteError as e:
                say("agent-client", f"passing over {ep}: {e}", self.env)
                answered = answered or (ep, e)
                continue
            try:
                token = self._token(ep, status, content)
            except (RemoteError, PolicyError) as e:
                if 400 <= status < 500 and _states_a_reason(content):
                    self.endpoint = ep
                    raise  # the agent's own refusal of this request
                answered = answered or (ep, e)
                continue
            self.endpoint = ep
            return token
        if answered is not None:
            self.endpoint = answered[0]
            raise answered[1]
        raise walk.none_answered(unreachable)

    def record(self, report: Mapping[str, object]) -> None:
        """POST the report to the agent's audit trail (agent/report.py); the agent names who."""
        body = dict(report)
        # Who reports is who minted: the grant, else the workload identity, else the owner.
        identity = self.identity.token() if self.grant is None and self.identity is not None else None
        if self.grant is None and identity is None:
            body["owner_sub"] = self.cfg.sub
        status, reply = call(self.endpoint, "POST", "/v1/audit/report", body, grant=self.grant, env=self.env,
                             identity=identity)
        del identity
        if status != 201:
            raise refusal(self.endpoint, status, reply)


def issued_by(token: Token, org: str) -> bool:
    """Whether the token's `iss` (its org) is `org`; read, not verified: we only decide where not to send it."""
    import binascii

    payload = token.reveal().split(".")[1] if token.reveal().count(".") == 2 else ""
    try:
        claims = binascii.a2b_base64(payload.replace("-", "+").replace("_", "/") + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        return False
    if claims.startswith(b'{"iss":"%s",' % org.encode()):  # the agent writes iss first, compact (tokens.Template)
        return True
    from .. import jsontext

    try:
        iss = jsontext.loads(claims).get("iss")
    except (ValueError, AttributeError):
        return False
    return isinstance(iss, str) and iss.lower() == org.lower()  # an org is a host's label: its case does not matter


def _states_a_reason(content: bytes) -> bool:
    """Whether an answer is the agent's own refusal: its line format with an `error`."""
    try:
        return bool(wire.decode(content).get("error"))
    except ProtocolError:
        return False


def token_from_reply(status: int, content: bytes, ep: Endpoint) -> Token:
    """The token in the agent's line-format reply, or the refusal it states."""
    try:
        reply = wire.decode(content)
    except ProtocolError:
        if status != 200:
            raise refusal(ep, status, {}) from None  # a proxy's or load balancer's error page: its status says more
        raise RemoteError(f"the codestore agent at {ep} sent an unreadable reply; is it a codestore agent of this version?") from None
    if status != 200:
        raise refusal(ep, status, reply)
    token, exp = reply.get("token", ""), reply.get("expires_at", "")
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not token or not (exp.isascii() and exp.isdigit()) or len(exp) > 12:
        raise RemoteError(f"the codestore agent at {ep} sent a reply without a token")
    return Token(token, int(exp))

