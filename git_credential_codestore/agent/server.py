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
    POST /v1/audit/report               owner or grant holder (report.py: pushes, promotions)
    POST /v1/audit/query                owner only (report.py)
    GET  /v1/status, GET/POST /v1/grants, POST /v1/grants/<id>/revoke, POST /v1/shutdown,
    GET/POST /v1/trust, POST /v1/trust/<id>/remove
                                        owner only (owner socket, owner uid, no grant)

A token request with `Authorization: Identity <jwt>` (a workload's OIDC token) is an
exchange under a trust policy (trust.py), on any listener; the grant rules do not apply.

Robustness: a thread per connection, at most MAX_CONNECTIONS at once; a read timeout
per operation and a whole-connection deadline enforced by a reaper thread (slow
clients cannot hold a thread for long); request bodies capped at MAX_BODY; any bug in a
request is a 500 for that request only.
"""

from __future__ import annotations

import _socket
import contextlib
import functools
import gc
import ipaddress
import json
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, TypeVar

from .. import jsontext, tokens, trace
from ..audit import check_text
from ..config import Config
from ..errors import CodestoreError, ConfigError, ProtocolError, UsageError, boundary, redact
from ..files import not_a_file
from ..vocab import TokenRequest, is_loopback, split_url
from . import policy, report, wire
from .audit import AuditLog, Change, recover, replica_of, told, withdraw
from .client import key_identity
from .db import StoreError
from .discovery import AGENT_KEY, default_socket, grant_socket, unix_address
from .grants import STATES, Grant, GrantStore, grant_id_of
from .identity import Verifier, https_fetcher
from .metrics import Metrics, Table
from .trust import Trust, TrustStore

MAX_BODY = 64 * 1024
GRANT_FIELDS = policy.TERMS | {"expires_in", "sub", "own_socket", "max_per_minute"}  # POST /v1/grants
MAX_HEAD = 16 * 1024  # request line and headers
MAX_GRANT_LIFE = 36500 * 86400  # seconds a grant may last (`--expires-in`)
MAX_CONNECTIONS = 1024
PER_PEER = 128  # connections one network address may hold at once: its fair share
IO_TIMEOUT = 5.0  # per read or write, and a TLS handshake
CONNECTION_DEADLINE = 15.0  # a whole request, however slowly it trickles in
# Token requests remembered (a body read; a grant's decision, under its Authorization value
# and body): at most 4096 of each, of bodies up to 1 KiB and Authorization values up to 256
# bytes (a grant's is 66). Both full of the largest: 19.5 MiB (tracemalloc), whatever is sent.
MEMO_REQUESTS, MEMO_BODY, MEMO_AUTHORIZATION = 4096, 1024, 256
DRAIN_TIMEOUT = 10.0  # shutdown: how long requests in flight may take to finish


def default_state_dir() -> str:
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("codestore"), "agent")


@dataclass(frozen=True)
class Caller:
    transport: str  # "socket" (owner socket) | "grant-socket" | "tcp"
    uid: int | None
    peer: str
    bound_grant: str | None = None


class Prepared:
    """A decided token but its times: its claims, audit entry and reply fields, encoded once."""

    __slots__ = ("decision", "token", "entry", "rest")

    def __init__(self, agent: Agent, decision: policy.Decision, req: TokenRequest, who: Mapping[str, object]) -> None:
        self.decision = decision
        self.token = tokens.Template(agent.key, org=agent.org, repo=decision.repo, scopes=decision.scopes, ttl=decision.ttl,
                                     sub=decision.sub, kid=agent.cfg.kid, refs=decision.refs or None)
        self.entry = agent.audit.prepare("mint", {
            **who, "sub": decision.sub, "repo": decision.repo, "ephemeral": req.ephemeral,
            "scopes": list(decision.scopes), "ttl": decision.ttl, "refs": decision.refs or None,
            "purpose": req.purpose, "result": "ok",
        })
        self.rest = wire.encode({"ttl": decision.ttl, "scopes": list(decision.scopes), "sub": decision.sub})


# A token request as it came: (Authorization, body, transport, peer, bound grant); and what
# was decided for it under a grant version: (the grant, the token prepared, who, the
# request's fields, GrantStore.replaced when the grant was read).
_Asked = tuple[str | None, bytes, str, str, str | None]
_Decided = tuple[Grant, Prepared, Mapping[str, object], object, int]


def _asked(caller: Caller, authorization: str | None, body: bytes) -> _Asked:
    """The key a grant's decision is remembered under (Agent.decide, Agent.answers_at_once)."""
    return authorization, body, caller.transport, caller.peer, caller.bound_grant


class Unsigned:
    """A token decided up to its signature (Agent.decide): signed by `Agent.finish`, or first
    in a row with others (`Agent.sign`, for `respond_tokens`)."""

    __slots__ = ("prepared", "who", "data", "grant", "signing_input", "exp", "signature")

    def __init__(self, prepared: Prepared, who: Mapping[str, object], data: object, grant: Grant | None) -> None:
        self.prepared, self.who, self.data, self.grant = prepared, who, data, grant
        self.signing_input, self.exp = prepared.token.signing_input()
        self.signature = b""

    def sign(self) -> bytes:
        return self.prepared.token.signer.sign(self.signing_input)


class Agent:
    """Request handling, independent of the wire: (caller, method, path, body) -> reply."""

    def __init__(self, cfg: Config, key: tokens.PrivateKey | tokens.Signer, key_where: str, key_id: str, store: GrantStore, audit: AuditLog) -> None:
        self.cfg = cfg
        self.org = cfg.require_org()
        # A key in memory is wrapped once: its algorithm and signature shape are not decided per token.
        self.key: tokens.LocalSigner | tokens.Signer = tokens.LocalSigner(key) if isinstance(key, tokens.PrivateKey) else key
        self._key_in_memory = isinstance(self.key, tokens.LocalSigner)
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
        self.draining = False
        self.request_deadline = CONNECTION_DEADLINE
        self.metrics = Metrics()
        self.front_name = ""
        self.in_flight: Callable[[], int] = lambda: 0
        # The signer's health, for /readyz (a PKCS#11 token can go away; a key in memory cannot).
        self.signer_health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        # Set by the daemon: open or close a grant's dedicated socket.
        self.on_grant_created: Callable[[Grant], str | None] = lambda g: None
        self.on_grant_revoked: Callable[[Grant], None] = lambda g: None
        self.grant_socket_path: Callable[[str], str] = lambda gid: ""
        self.trust: Trust | None = None  # workload-identity exchange (trust.py), set by the daemon
        # Read once: the environment of a running agent does not change, and the check
        # costs more than a cached grant lookup on every token.
        self.tracing = trace.target() is not None
        self._requests: dict[bytes, tuple[TokenRequest, dict[str, str], TokenRequest | policy.Refused]] = {}
        self._decided: dict[_Asked, _Decided] = {}  # see decide

    # -- the router -------------------------------------------------------------------

    _ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
        ("GET", re.compile(r"/v1/ping"), "ping"),
        # For load balancers and Prometheus, on every listener: counts and health, no secrets.
        ("GET", re.compile(r"/healthz"), "healthz"),
        ("GET", re.compile(r"/readyz"), "readyz"),
        ("GET", re.compile(r"/metrics"), "metrics"),
        ("GET", re.compile(r"/v1/status"), "status"),
        ("GET", re.compile(r"/v1/grant"), "own_grant"),
        ("GET", re.compile(r"/v1/grants"), "list_grants"),
        ("POST", re.compile(r"/v1/grants"), "create_grant"),
        ("POST", re.compile(r"/v1/grants/([0-9a-f]{1,32})/revoke"), "revoke_grant"),
        ("POST", re.compile(r"/v1/shutdown"), "shutdown"),
        ("GET", re.compile(r"/v1/trust"), "list_trust"),
        ("POST", re.compile(r"/v1/trust"), "add_trust"),
        ("POST", re.compile(r"/v1/trust/([0-9a-f]{1,32})/remove"), "remove_trust"),
    ) + report.ROUTES
    _ADMIN = frozenset(
        {"status", "list_grants", "create_grant", "revoke_grant", "shutdown", "list_trust", "add_trust", "remove_trust"}
    ) | report.ADMIN

    def dispatch(self, caller: Caller, method: str, target: str, authorization: str | None, body: bytes) -> tuple[int, dict[str, object]]:
        self.last_activity = time.monotonic()
        path, _, query = target.partition("?")
        for m, pattern, route in self._ROUTES:
            match = pattern.fullmatch(path)
            if match and m == method:
                name = route  # the route's name, used below
                break
        else:
            return 404, {"error": f"no such agent endpoint {method} {path[:60]}"}
        if name in self._ADMIN:
            if caller.transport != "socket" or authorization is not None or caller.uid != self.owner_uid:
                # A grant holder must never create grants (it would widen its own).
                with contextlib.suppress(OSError):  # refused all the same; the row is kept (AuditLog.record)
                    self.audit.record("refuse", {"action": name, "peer": caller.peer, "via": caller.transport, "reason": "admin call from a non-owner"})
                return 403, {"error": "administrative calls are accepted only from the owner on the agent's own socket, without a grant"}
        try:
            data = jsontext.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "request body is not JSON"}
        if name in report.HANDLERS:
            return report.HANDLERS[name](self, caller, authorization, data)
        if name == "ping":
            return 200, {"ok": True, "agent": "codestore"}
        if name == "healthz":
            return 200, {"ok": True}
        if name == "readyz":
            return self.readyz(caller.transport == "socket" and caller.uid == self.owner_uid)
        if name == "metrics":
            return 200, {"text": self.render_metrics()}
        if name == "status":
            return 200, self.status()
        if name == "own_grant":
            return self.own_grant(caller, authorization)
        if name == "list_grants":
            return self.list_grants(query)
        if name == "create_grant":
            return self.create_grant(data)
        if name == "revoke_grant":
            return self.revoke_grant(match.group(1))
        if name.endswith("_trust"):
            if self.trust is None:
                return 404, {"error": "this agent has no workload-identity exchange"}
            if name == "list_trust":
                return self.trust.list()
            return self.trust.add(self, data) if name == "add_trust" else self.trust.remove(self, match.group(1))
        self.stop.set()
        return 200, {"ok": True, "pid": self.metrics.table.pid}  # the agent's, as status says, whichever worker answers

    # -- minting ----------------------------------------------------------------------

    def answers_at_once(self, caller: Caller, method: str, target: str, authorization: str | None,
                        body: bytes | None = None) -> bool:
        """Whether this request can be answered without waiting on anything (no database
        query, no network, no PKCS#11 token): a token under the owner's authority or under a
        grant this replica's cache holds (kept fresh by the store's poll, so a revocation
        still refuses within STALE_AFTER), signed by a key in memory, with no per-minute
        limit (counted in the database). The fleet front answers these on its event loop
        instead of handing them to a worker thread: the hand-off cost more than the mint.

        With the `body` (a request read whole), a request decided before under a grant
        version still cached is known without parsing the secret or looking the grant up
        (decide remembers only grants with no per-minute limit).
        """
        if method != "POST" or target != "/v1/token" or not self._key_in_memory:
            return False
        if body is not None:
            known = self._decided.get(_asked(caller, authorization, body))
            if known is not None and known[4] == self.store.replaced:
                return True
        gid = caller.bound_grant
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme != "Grant":  # a workload identity is checked against its issuer: not at once
                return not (self.trust is not None and self.trust.presented(authorization))
            gid = grant_id_of(value.strip()) if gid is None else gid
            if gid is None:
                return True  # refused without a lookup
        if gid is None:
            return True  # the owner: decided from the request alone
        grant = self.store.cached(gid)
        return grant is not None and not grant.max_per_minute

    def _grant_for(self, caller: Caller, authorization: str | None) -> tuple[Grant | None, str | None]:
        """(grant, None) for a grant holder, (None, None) for the owner, or (None, reason)."""
        secret = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme != "Grant" or not value.strip():
                return None, "the Authorization header must be `Grant <secret>`"
            secret = value.strip()
        if caller.bound_grant is not None:
            grant = self.store.get(caller.bound_grant)  # StoreError: the caller refuses
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

    def _read_request(self, body: bytes) -> tuple[TokenRequest, dict[str, str], TokenRequest | policy.Refused]:
        """(request, owner fields, the request checked or why not) of a token request body.

        A pure function of the bytes, remembered for the last few thousand distinct bodies:
        a sandbox's helpers send the same few bodies all day, and reading one is a fifth of
        a token's work. Who asks and what they may have are decided per request, after this.
        ProtocolError for a body that is not this format (not remembered).
        """
        known = self._requests.get(body)
        if known is None:
            request, owner = wire.decode_request(body)
            try:
                checked: TokenRequest | policy.Refused = policy.check_request(request)
            except policy.Refused as e:
                checked = e
            known = (request, owner, checked)
            if len(body) <= MEMO_BODY:
                if len(self._requests) >= MEMO_REQUESTS:
                    self._requests.clear()  # a flood of distinct bodies costs speed, never memory
                self._requests[body] = known
        return known

    def decide(self, caller: Caller, authorization: str | None, body: bytes) -> tuple[int, dict[str, object]] | Unsigned:
        """A token request up to the token's signature: the reply (a refusal, a workload
        identity's exchange), or the token to sign and hand out (`finish`)."""
        # A grant's decision for one request depends on nothing else while the grant has no
        # expiry (its TTL is clamped to what is left of it) and no per-minute limit: remembered
        # under the request as it came (the Authorization value, the body, who asks) with the
        # grant version it was decided under. One lookup then stands for reading the body,
        # checking the secret and deciding: with 1000 grants in use each of those was a
        # separate object per grant, out of the CPU's caches by the grant's next token. The
        # version is the cached grant object itself (a change, a revocation, caches a new
        # one), vouched for by the store's count of replaced grants while that stands still.
        replaced = self.store.replaced  # before any lookup it vouches for
        asked = _asked(caller, authorization, body)
        known = self._decided.get(asked)
        if known is not None:
            try:
                self.store.check()  # as the full path's lookup does: never mint on a stale view
            except StoreError:
                pass  # the full path refuses, saying why
            else:
                held, prepared, who_, data_, since = known
                if since == replaced or self.store.cached(held.id) is held:
                    if since != replaced:
                        self._decided[asked] = (held, prepared, who_, data_, replaced)
                    return Unsigned(prepared, who_, data_, held)
        try:
            request, owner, checked = self._read_request(body)
        except ProtocolError as e:
            return 400, {"error": f"bad token request: {e}"}
        data = {"repo": request.repo, "scopes": list(request.scopes), "ttl": request.ttl, "ephemeral": request.ephemeral}
        if self.trust is not None and self.trust.presented(authorization):
            return self.trust.exchange(self, caller, authorization or "", request, data)  # a workload identity, not a grant
        try:
            grant, reason = self._grant_for(caller, authorization)
        except StoreError as e:
            # Never mint under a grant that cannot be checked (it may have been revoked). Said to a
            # sandbox: not the database's address or the driver's words (the owner's log has them).
            grant, reason, status = None, e.public, 503
        else:
            status = 401
        who: dict[str, object] = {"grant": grant.id if grant else None, "via": caller.transport, "peer": caller.peer}
        if reason is not None:
            secret = (authorization or "").partition(" ")[2].strip()
            who["grant"] = grant_id_of(secret)  # the id a presented secret claims, never the secret
            return self._refuse(who, data, reason, status)
        if isinstance(checked, policy.Refused):
            return self._refuse(who, data, checked.reason, checked.status, grant)
        req = checked
        try:
            if grant is not None:
                decision = policy.clamp_to_grant(grant, req, self.cfg.ttl)
            else:
                sub = self._check_owner(owner or None)
                decision = policy.clamp_for_owner(req, self.cfg, sub)
        except policy.Refused as e:
            return self._refuse(who, data, e.reason, e.status, grant)
        if grant is not None and grant.max_per_minute:
            try:
                used = self.store.take_rate(grant)
            except StoreError as e:
                return self._refuse(who, data, f"{e.public}; the grant's rate limit cannot be checked", 503, grant)
            if used > grant.max_per_minute:
                return self._refuse(who, data, f"grant {grant.id} allows {grant.max_per_minute} tokens a minute; try again shortly", 429, grant)
        remember = (grant is not None and grant.expires_at is None and not grant.max_per_minute
                    and len(body) <= MEMO_BODY and len(authorization or "") <= MEMO_AUTHORIZATION)
        return self._unsigned(decision, req, who, data, grant, (asked, replaced) if remember else None)

    def issue(self, decision: policy.Decision, req: TokenRequest, who: Mapping[str, object], data: object,
              grant: Grant | None = None) -> tuple[int, dict[str, object]]:
        """Sign a decided token and write its audit line; `who` says on whose authority."""
        outcome = self._unsigned(decision, req, who, data, grant)
        return outcome if isinstance(outcome, tuple) else self.finish(outcome)

    def _unsigned(self, decision: policy.Decision, req: TokenRequest, who: Mapping[str, object], data: object,
                  grant: Grant | None, asked: tuple[_Asked, int] | None = None) -> tuple[int, dict[str, object]] | Unsigned:
        """A decided token, to sign; with `asked` (a grant's request, and the store's count of
        replaced grants read before the grant was), remembered under it (see decide)."""
        try:
            prepared = Prepared(self, decision, req, who)
        except CodestoreError as e:
            return self._refuse(who, data, str(e), 400, grant)
        if asked is not None and grant is not None:
            if len(self._decided) >= MEMO_REQUESTS:
                self._decided.clear()  # many distinct requests cost speed, never memory
            self._decided[asked[0]] = (grant, prepared, who, data, asked[1])
        return Unsigned(prepared, who, data, grant)

    @staticmethod
    def sign(batch: Collection[Unsigned]) -> None:
        """Sign decided tokens one after another, before `finish` hands each out: signatures
        in a row run with the signer's code and tables in the core's caches; between other
        work, a signature cost the agent 75 us of CPU instead of 47. A signer that fails
        here is left to `finish`, which asks it again and refuses as it does for one."""
        for unsigned in batch:
            try:
                unsigned.signature = unsigned.sign()
            except CodestoreError:
                pass

    def finish(self, unsigned: Unsigned) -> tuple[int, dict[str, object]]:
        """Sign a decided token (unless `sign` did), write its audit line, and answer with it."""
        prepared, who, data, grant = unsigned.prepared, unsigned.who, unsigned.data, unsigned.grant
        decision = prepared.decision
        try:
            signature = unsigned.signature or unsigned.sign()
        except tokens.SignerUnavailable as e:
            self.metrics.signer_failed()
            return self._refuse(who, data, str(e), 503, grant)
        except CodestoreError as e:
            return self._refuse(who, data, str(e), 400, grant)
        token = prepared.token.signed(unsigned.signing_input, signature, unsigned.exp)
        try:
            self.audit.emit(prepared.entry)
        except OSError as e:
            # Every token handed out is in the audit log, or it is not handed out; refused
            # as any refusal is, so the table has it (AuditLog.record keeps a refusal's row).
            return self._refuse(who, data, f"cannot write the audit log {self.audit.path} ({e.strerror}); nothing was minted", 503, grant)
        if grant is not None:
            self.store.record_use(grant, ok=True)
        if self.tracing:
            trace.say("agent", f"minted {decision.repo} {' '.join(decision.scopes)} ttl {decision.ttl}s for "
                      f"{'grant ' + grant.id if grant else 'the owner'} ({who.get('via')})")
        return 200, wire.token_reply(token.reveal(), token.expires_at, decision.ttl, list(decision.scopes), decision.sub, prepared.rest)

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
        return sub if policy.is_sub(sub) else self.cfg.sub

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
        try:
            self.audit.record("refuse", fields)
        except OSError:
            pass  # a refusal hands out nothing; its reason still reaches the caller
        if self.tracing:
            trace.say("agent", f"refused {fields.get('repo') or '-'} for grant {who.get('grant') or '(owner)'}: {reason}")
        code = "mismatch" if status == 409 else "refused"
        return status, {"error": reason, "code": code}

    # -- administration ---------------------------------------------------------------

    def create_grant(self, data: object) -> tuple[int, dict[str, object]]:
        if not isinstance(data, dict):
            return 400, {"error": "grant request must be a JSON object"}
        try:
            policy.only_known(data, GRANT_FIELDS, "a grant")
            terms = policy.parse_terms(data)  # shared with trust policies: the same limits
            expires_in = data.get("expires_in")
            if expires_in is not None and (not isinstance(expires_in, int) or isinstance(expires_in, bool)
                                           or not 1 <= expires_in <= MAX_GRANT_LIFE):
                raise ConfigError(f"--expires-in must be a positive duration of at most {MAX_GRANT_LIFE // 86400}d")
            sub = data.get("sub")
            if sub is not None and not policy.is_sub(sub):
                raise ConfigError("--sub must be a short identifier without control characters")
            own_socket = policy.flag(data, "own_socket")
            rate = data.get("max_per_minute")
            if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= 1_000_000):
                raise ConfigError(f"--max-per-minute must be 1..1000000, not {rate!r}")
        except CodestoreError as e:
            return 400, {"error": str(e)}
        audit: Change[Grant] = Change(self.audit, "grant-create", lambda grant: {
            "grant": grant.id, "sub": grant.sub, "repos": grant.repos, "scopes": grant.scopes,
            "max_ttl": grant.max_ttl, "expires_at": grant.expires_at, "ephemeral_only": grant.ephemeral_only,
            "refs": grant.refs or None, "max_per_minute": grant.max_per_minute,
        })
        try:
            grant, secret = self.store.create(
                repos=terms.repos, scopes=terms.scopes, max_ttl=terms.max_ttl, sub=sub,
                expires_at=int(time.time()) + expires_in if expires_in else None,
                ephemeral_only=terms.ephemeral_only, refs=terms.refs,
                own_socket=own_socket, max_per_minute=rate, audit=audit,
            )
        except StoreError as e:
            if e.maybe_committed:  # its secret was never handed out: nobody can use it
                return 503, {"error": f"the grant was not handed out: {e}; if it appears in `codestore grant list`, revoke it"}
            return 503, {"error": f"no grant was created: {e}"}
        # Durable from here on: whatever fails next, the admin hears that the grant exists.
        reply = grant.public()
        reply["grant"] = secret.reveal()
        audit_warning, socket_warning = audit.after(), None
        try:
            reply["socket"] = self.on_grant_created(grant) if grant.own_socket else None
        except (OSError, CodestoreError) as e:
            reply["socket"] = None
            socket_warning = f"its socket could not be opened ({getattr(e, 'strerror', None) or e})"
        return 201, told(reply, f"grant {grant.id} was created", audit_warning, socket_warning)

    def revoke_grant(self, gid: str) -> tuple[int, dict[str, object]]:
        def close_socket(grant: Grant) -> str | None:
            try:
                self.on_grant_revoked(grant)
            except OSError as e:
                return f"its socket could not be closed ({e.strerror})"
            return None

        return withdraw(self.audit, "grant-revoke", lambda grant: {"grant": grant.id, "sub": grant.sub},
                        lambda audit: self.store.revoke(gid, audit=audit),
                        name=f"grant {gid}", listing="grant", verb="revoked", done="is revoked", then=close_socket)

    def list_grants(self, query: str) -> tuple[int, dict[str, object]]:
        from urllib.parse import parse_qs

        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        state = q.get("state")
        if state is not None and state not in STATES:
            return 400, {"error": f"state must be one of {', '.join(STATES)}, not {state[:20]!r}"}
        limit = q.get("limit", "100")
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 1000):
            return 400, {"error": "limit must be 1..1000"}
        try:
            for key in ("repo", "sub"):
                # No grant holds one (repos and subs are checked as grants are made), and
                # PostgreSQL refuses a NUL in a query: a 503 "the store failed" for bad input.
                if (value := q.get(key)) is not None:
                    check_text(value, key)
        except ConfigError as e:
            return 400, {"error": str(e)}
        try:
            grants, cursor = self.store.page(repo=q.get("repo"), sub=q.get("sub"), state=state, after=q.get("after"), limit=int(limit))
        except CodestoreError as e:
            return (503 if isinstance(e, StoreError) else 400), {"error": str(e)}
        return 200, {"grants": [g.public() for g in grants], "next_cursor": cursor}

    def readyz(self, owner: bool = True) -> tuple[int, dict[str, object]]:
        """Ready when the store and the signer answer and the agent is not draining.

        The store is ready when the grant poll has heard from it within STALE_AFTER: the
        same test minting passes. Not a query of its own: a database that stops answering
        without closing its connections (a paused VM, a storage stall) held that query,
        and a load balancer's probe, for as long as it stayed away.
        """
        store_ok, store_why = self.store.healthy
        signer_ok, signer_why = self.signer_health()
        ready = store_ok and signer_ok and not self.draining
        if not owner:  # a probe over TCP, or a sandbox: whether, not the database's address or the driver's words
            store_why = "ok" if store_ok else "the grant store is not answering"
            signer_why = "ok" if signer_ok else "the signer is not answering"
        reply: dict[str, object] = {"ready": ready, "store": store_why, "signer": signer_why}
        if self.draining:
            reply["draining"] = True
        return (200 if ready else 503), reply

    def publish_metrics(self) -> None:
        """Copy the counts this worker's store, audit log and front keep into its metrics slot."""
        self.metrics.publish(self.store.errors, self.audit.dropped, self.in_flight(), self.audit.buffered, self.store.reads)

    def render_metrics(self) -> str:
        grants: dict[str, float] = {}
        if self.store.healthy[0]:  # a store the poll cannot reach would hold the scrape to the query deadline
            try:
                grants = dict(self.store.counts())
            except StoreError:
                pass
        store_ok, _ = self.store.healthy
        signer_ok, _ = self.signer_health()
        self.publish_metrics()
        return self.metrics.render(
            gauges={"store_up": int(store_ok), "signer_up": int(signer_ok), "draining": int(self.draining)},
            labelled={"grants": grants} if grants else {},
        )

    def own_grant(self, caller: Caller, authorization: str | None) -> tuple[int, dict[str, object]]:
        """GET /v1/grant: the caller's own grant, as far as it bounds what the caller may do
        (null for the owner); nothing minted, nothing audited. What `codestore doctor` asks in a sandbox: a test
        token would need a repository the grant covers, and each refusal was an audit line."""
        try:
            grant, reason = self._grant_for(caller, authorization)
        except StoreError as e:
            return 503, {"error": e.public}
        if reason is not None:
            return 401, {"error": reason}
        if grant is None:
            return 200, {"grant": None}  # the owner, who needs none
        return 200, {"grant": {"id": grant.id, "state": grant.state(), "sub": grant.sub, "repos": list(grant.repos),
                               "scopes": list(grant.scopes), "ephemeral_only": grant.ephemeral_only,
                               "max_ttl": grant.max_ttl, "expires_at": grant.expires_at}}

    def status(self) -> dict[str, object]:
        try:
            self.store.check()  # a store the poll cannot reach would hold the reply to the query deadline
            states: dict[str, object] = dict(self.store.counts())
        except StoreError as e:
            healthy, why = self.store.healthy
            states = {"error": str(e) if healthy else why}  # the owner's: the address and the driver's words
        # The agent as a whole, whichever worker answers: its pid is the one `serve` printed,
        # and the token counts are /metrics' (every worker's).
        minted, refused = self.metrics.tokens()
        return {
            "pid": self.metrics.table.pid, "workers": self.metrics.table.workers, "worker_pid": os.getpid(),
            "socket": self.socket_path, "listen": self.listen_url or None,
            "org": self.org, "kid": self.cfg.kid, "key": self.key_where,
            "state_dir": self.store.state_dir, "store": self.store.where, "audit_log": self.audit.path,
            "uptime": int(time.time() - self.started), "grants": states,
            "mints": minted, "refusals": sum(refused.values()), "refused": {r: n for r, n in refused.items() if n},
        }


# -- the wire, whichever front carries it ----------------------------------------------


class Slots:
    """Connections held, overall (MAX_CONNECTIONS) and per peer (PER_PEER; `share` says whose).

    Both HTTP fronts count here from accept; "" is the owner's socket, bounded only overall.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self._peers: dict[str, int] = {}

    def take(self, peer: str) -> bool:
        with self._lock:
            if self.total >= MAX_CONNECTIONS or (peer and self._peers.get(peer, 0) >= PER_PEER):
                return False
            self.total += 1
            if peer:
                self._peers[peer] = self._peers.get(peer, 0) + 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            self.total -= 1
            if peer:
                n = self._peers.pop(peer) - 1
                if n:
                    self._peers[peer] = n


def share(transport: str, address: object, bound_grant: str | None) -> str:
    """Whose fair share (PER_PEER) a connection counts against, for `Slots`.

    A network address: an IPv4 address, or an IPv6 address's /64, which is one host's or
    one network's (SLAAC, RFC 6177) and holds more addresses than any limit could count;
    or a grant's own socket, which is mounted into one sandbox, so all its connections are
    that sandbox's; "" for the owner's socket (its peers are the owner's uid or root),
    bounded only by MAX_CONNECTIONS.
    """
    if transport == "tcp":
        host = str(address[0]) if isinstance(address, tuple) else ""
        if ":" not in host:
            return host
        try:
            ip = ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return host
        if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return f"grant:{bound_grant}" if bound_grant else ""


def peer_uid(sock: _socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED, BSD/macOS LOCAL_PEERCRED)."""
    if hasattr(socket, "SO_PEERCRED"):
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid
    if hasattr(socket, "LOCAL_PEERCRED"):  # pragma: no cover - macOS
        raw = sock.getsockopt(0, socket.LOCAL_PEERCRED, struct.calcsize("2I"))
        return struct.unpack("2I", raw[:8])[1]
    return None  # pragma: no cover - unknown platform: treated as not the owner


def identify(sock: _socket.socket, address: object, transport: str, bound_grant: str | None) -> Caller:
    if transport == "tcp":
        host = address[0] if isinstance(address, tuple) else str(address)
        return Caller("tcp", None, str(host))
    uid = peer_uid(sock)
    return Caller(transport, uid, f"uid:{uid}", bound_grant)


Reply = tuple[int, Mapping[str, object]]
_T = TypeVar("_T")


def admit(agent: Agent, caller: Caller) -> Reply | None:
    """The Unix sockets' rule: the owner's uid or root, nobody else, whatever the file modes say."""
    if caller.transport == "tcp" or caller.uid in {agent.owner_uid, 0}:  # root can read our memory anyway
        return None
    try:
        agent.audit.record("refuse", {"via": caller.transport, "peer": caller.peer, "result": "refused", "reason": "peer uid is not the owner"})
    except OSError:
        pass
    return 403, {"error": f"peer uid {caller.uid} may not use this agent (owner uid {agent.owner_uid})"}


def framing(header: Callable[[str], str | None]) -> tuple[Reply | None, int]:
    """(refusal, 0) for a body we will not read, else (None, its length)."""
    if header("Transfer-Encoding"):
        return (411, {"error": "send a Content-Length, not chunked encoding"}), 0
    raw = (header("Content-Length") or "0").strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        return (400, {"error": "bad Content-Length"}), 0
    if int(raw) > MAX_BODY:
        return (413, {"error": f"request body over {MAX_BODY} bytes"}), 0
    return None, int(raw)


def encode(status: int, reply: Mapping[str, object], lines: bool = False) -> tuple[bytes, str]:
    error = reply.get("error")
    if isinstance(error, str):
        # Every error reply goes out through here: a secret the request carried (a grant in
        # the path, a token as the method) is not sent back, whichever check quoted it.
        reply = {**reply, "error": redact(error)}
    if lines:
        return wire.encode_reply(reply), wire.CONTENT_TYPE
    return json.dumps(reply).encode(), "application/json"


def respond(agent: Agent, caller: Caller, method: str, target: str, header: Callable[[str], str | None], body: bytes) -> tuple[int, bytes, str]:
    """One request, already framed, to (status, body, content type)."""
    # POST /v1/token speaks lines both ways (wire.py), and goes the one way every token goes;
    # every other endpoint JSON, through Agent.dispatch.
    if (method, target) == ("POST", "/v1/token"):
        return respond_tokens(agent, [(caller, header("Authorization"), body)])[0]
    if (header("Content-Type") or "").split(";")[0].strip() == wire.CONTENT_TYPE:
        return (415, *encode(415, {"error": f"{wire.CONTENT_TYPE} is accepted only by POST /v1/token"}))
    status, reply = _guarded(method, target, agent.dispatch, caller, method, target, header("Authorization"), body)
    if "text" in reply and len(reply) == 1 and status == 200:  # /metrics: Prometheus' text format
        return status, str(reply["text"]).encode(), "text/plain; version=0.0.4"
    return (status, *encode(status, reply))


def respond_tokens(agent: Agent, requests: Collection[tuple[Caller, str | None, bytes]]) -> list[tuple[int, bytes, str]]:
    """Token requests (caller, Authorization, body), already framed: decided one by one,
    signed in a row (Agent.sign), then each audited, answered and observed in the metrics
    (a bug's 500 too). The one way every token goes: `respond` sends each of its own here,
    the fleet front its connections accepted together (asgi.AsgiFront._serve)."""
    agent.last_activity = time.monotonic()
    t0 = time.perf_counter()
    outcomes = [_guarded("POST", "/v1/token", agent.decide, *request) for request in requests]
    agent.sign([o for o in outcomes if isinstance(o, Unsigned)])
    replies = []
    for outcome in outcomes:
        status, reply = _guarded("POST", "/v1/token", agent.finish, outcome) if isinstance(outcome, Unsigned) else outcome
        agent.metrics.observe(status, time.perf_counter() - t0)
        replies.append((status, *encode(status, reply, lines=True)))
    return replies


def _guarded(method: str, target: str, handler: Callable[..., _T], *args: object) -> _T | tuple[int, dict[str, object]]:
    """handler(*args), or a 500 for its bug: one request's bug must not take down the agent."""
    try:
        return handler(*args)
    except Exception as e:  # noqa: BLE001
        print(f"codestore agent: internal error on {method} {target[:60]}: {redact(repr(e))}", file=sys.stderr, flush=True)
        return 500, {"error": f"internal error in the agent ({type(e).__name__}); see its log"}


def prepare_socket_dir(path: str, is_default: bool) -> int:
    """Make the socket's 0700 directory and claim `path`; returns a lock held for the agent's life.

    Only a socket that no agent answers is ever removed: a regular file (or anything that
    is not a socket) at `path` is refused, not deleted. Two agents starting at once for one
    path are serialised by an exclusive lock on `<path>.lock`: the second is told an agent
    is running, and the first keeps serving.
    """
    import fcntl
    import stat

    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d) if is_default else os.stat(d)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{d} is not a directory; pass --socket with a path in a private directory") from None
    except OSError as e:
        hint = "set XDG_RUNTIME_DIR to a private directory of yours, or pass --socket" if is_default else "pass --socket with a path in a directory you own"
        raise UsageError(f"cannot create {d} ({e.strerror}); {hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{d} is not a directory (a symlink?); set XDG_RUNTIME_DIR to a private directory of yours")
    if st.st_uid != os.getuid():
        raise UsageError(f"{d} belongs to uid {st.st_uid}, not you; set XDG_RUNTIME_DIR or pass --socket in a directory you own")
    if is_default:
        os.chmod(d, 0o700)
    elif st.st_mode & 0o077:
        raise UsageError(f"{d} is open to other users (mode {st.st_mode & 0o777:o}); put the socket in a private 0700 directory")
    if os.path.isdir(path):
        raise UsageError(f"--socket {path} is a directory; name a socket file in it, e.g. {os.path.join(path, 'agent.sock')}")
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UsageError(f"cannot create {path}.lock ({e.strerror}); pass --socket with a path in a directory you own") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise ConfigError(f"an agent is already running at {path}; stop it with: codestore agent stop") from None
    try:
        _claim(path)
    except BaseException:
        os.close(lock)
        raise
    return lock


def _claim(path: str) -> None:
    """Remove a stale socket at `path`; refuse anything else that is there."""
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it: move it away or pass another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        with unix_address(path) as addr:
            probe.connect(addr)
    except ConnectionRefusedError:
        os.unlink(path)  # a socket nobody listens on: left by an agent that died
    except OSError as e:
        raise ConfigError(f"cannot tell whether an agent answers at {path} ({e.strerror}); remove it if none does") from None
    else:
        raise ConfigError(f"an agent is already running at {path}; stop it with: codestore agent stop")
    finally:
        probe.close()


def parse_listen(value: str) -> tuple[str, int]:
    # vocab's URL splitter holds the one port rule (ASCII digits only: "²".isdigit() is
    # true and int() then raises).
    url = split_url(f"http://{value}")
    try:
        port = url.port
    except ValueError:
        port = None
    if port is None or not url.host or url.userinfo is not None or url.path or url.query or url.fragment:
        raise UsageError(f"--listen wants HOST:PORT (e.g. 127.0.0.1:8765), not {value!r}")
    return url.host, port


def _remove_socket(lst: object) -> None:
    try:
        # Only our own socket: a newer agent may have taken the path over.
        if os.stat(lst.path).st_ino == lst.inode:  # type: ignore[attr-defined]
            os.unlink(lst.path)  # type: ignore[attr-defined]
    except OSError:
        pass


def _has_fleet_front() -> bool:
    try:
        from . import asgi  # noqa: F401
    except ImportError:
        return False
    return True


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at `path`, 0600 (its directory is the agent's, 0700)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as addr:
            sock.bind(addr)
        os.chmod(path, 0o600)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def bind_tcp(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def make_front(agent: Agent, which: str) -> Front:
    """uvicorn's front when the fleet extra is installed (or asked for), else the threaded one."""
    if which in ("auto", "uvicorn"):
        try:
            from .asgi import AsgiFront
        except ImportError:
            if which == "uvicorn":
                raise UsageError("--server uvicorn needs the fleet extra: pip install 'codestore-git[fleet]'") from None
        else:
            return AsgiFront(agent)
    from .threads import ThreadFront

    return ThreadFront(agent)


class Front(Protocol):
    # A listener is the front's own object: serve() only hands it back to stop_listener.
    name: str

    @property
    def in_flight(self) -> int: ...
    def listen_unix(self, path: str, transport: str = ..., bound_grant: str | None = ..., sock: socket.socket | None = ...) -> Any: ...
    def listen_tcp(self, address: tuple[str, int], tls: ssl.SSLContext | None, sock: socket.socket | None = ...) -> tuple[Any, tuple[str, int]]: ...
    def stop_listener(self, lst: Any) -> None: ...
    def drain(self, timeout: float) -> None: ...


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
    store_url: str | None = None,
    server: str = "auto",
    request_deadline: float | None = None,
    key_uri: str | None = None,
    workers: int = 1,
    out: TextIO = sys.stdout,
) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT, `agent stop` or idle timeout."""
    from .. import keys

    os.umask(0o077)  # everything the agent creates is private to its owner
    if workers > 1:
        if idle_timeout:
            raise UsageError("--idle-timeout stops one agent process; with --workers, stop the agent with `codestore agent stop`")
        if server == "threads" or not _has_fleet_front():
            raise UsageError("--workers needs the fleet front (uvicorn): pip install 'codestore-git[fleet]'")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tcp_address = parse_listen(listen) if listen else None
    if tcp_address and not tls_cert and not is_loopback(tcp_address[0]):
        raise ConfigError(
            f"refusing to serve grants over plain HTTP on {tcp_address[0]}: pass --tls-cert/--tls-key, "
            "or listen on 127.0.0.1 behind a TLS tunnel"
        )
    cfg.require_org()
    signer: tokens.PrivateKey | tokens.Signer
    if key_uri:
        from ..hsm import Pkcs11Signer

        signer = Pkcs11Signer(key_uri, env)  # the key stays in the token
        where = str(signer.uri)
    else:
        signer, where = keys.load_private_key(cfg, env)
    state_dir = state_dir or default_state_dir()
    is_default = socket_path is None
    socket_path = os.path.abspath(socket_path or default_socket(env))
    prepare_socket_dir(socket_path, is_default)  # its lock is held until this process exits
    tls = None
    if tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # No TLS 1.3 session tickets: helpers are new processes that never resume a session,
        # and each handshake made and sent two for nothing.
        tls.num_tickets = 0
        for path in (tls_cert, tls_key):
            if path and not_a_file(path):  # a named pipe would hold the start forever
                raise ConfigError(f"--tls-cert/--tls-key {path} is not a regular file; name the PEM files")
        try:
            tls.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the TLS certificate/key ({type(e).__name__}); check --tls-cert and --tls-key") from None

    store = GrantStore(state_dir, store_url).open()
    try:
        trust_store = TrustStore(store.db, state_dir).open()
    except BaseException:
        store.close()
        raise
    site = _Site(cfg=cfg, env=env, signer=signer, where=where, key_uri=key_uri, socket_path=socket_path,
                 state_dir=state_dir, audit_path=audit_path, tcp_address=tcp_address, listen=listen, tls=tls,
                 idle_timeout=idle_timeout, server=server, request_deadline=request_deadline, out=out)
    _recover_audit(site, store)  # before this agent's own writers open the file
    if workers > 1:
        if key_uri:
            signer.release()  # type: ignore[union-attr]  # each worker opens its own session on the token
        return _serve_workers(site, store, trust_store, workers)
    return _serve_one(site, store, trust_store)


@dataclass
class _Site:
    """What `serve` decided before any listener opens: the same for every worker."""

    cfg: Config
    env: Mapping[str, str]
    signer: tokens.PrivateKey | tokens.Signer
    where: str
    key_uri: str | None
    socket_path: str
    state_dir: str
    audit_path: str | None
    tcp_address: tuple[str, int] | None
    listen: str | None
    tls: ssl.SSLContext | None
    idle_timeout: float
    server: str
    request_deadline: float | None
    out: TextIO

    @property
    def audit_file(self) -> str:
        return self.audit_path or os.path.join(self.state_dir, "audit.log")


def _recover_audit(site: _Site, store: GrantStore, writers: Collection[str] | None = None) -> None:
    """Into the database, the audit records killed agent processes left only in the file
    (audit.recover: at start every writer's, for a worker started again the dead one's)."""
    path = site.audit_file
    try:
        n = recover(store.db, path, writers)
    except (StoreError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        print(f"codestore agent: could not check {path} for audit records a killed agent process did not store ({why}); "
              "they stay in the file", file=sys.stderr, flush=True)
        return
    if n:
        print(f"codestore agent: added to the database {n} audit record(s) that a killed agent process had written only to {path}",
              file=sys.stderr, flush=True)


def _serve_one(site: _Site, store: GrantStore, trust_store: TrustStore, worker: int | None = None,
               sockets: tuple[socket.socket, socket.socket | None] | None = None, ready: Callable[[], None] | None = None,
               metrics: Metrics | None = None, restarted: bool = False) -> int:
    """One agent process: the whole agent, or (with `worker`) one of several on shared sockets
    counting into their shared `metrics` table; `restarted`, in the place of one that died."""
    cfg, env, key_uri, socket_path, tcp_address = site.cfg, site.env, site.key_uri, site.socket_path, site.tcp_address
    signer, where, tls, listen, idle_timeout, out = site.signer, site.where, site.tls, site.listen, site.idle_timeout, site.out
    try:
        audit = AuditLog(site.audit_file)
    except BaseException:
        store.close()
        raise
    store.on_flush = audit.flush_into
    store.start()
    key_id = key_identity(cfg, {**env, AGENT_KEY: key_uri} if key_uri else env)
    agent = Agent(cfg, signer, where, key_id, store, audit)
    if metrics is not None:
        agent.metrics = metrics
    agent.trust = Trust(trust_store, Verifier(https_fetcher(env.get("CODESTORE_OIDC_CA_FILE"))))
    if key_uri:
        agent.signer_health = signer.health  # type: ignore[union-attr]
    agent.socket_path = socket_path
    agent.request_deadline = site.request_deadline or CONNECTION_DEADLINE
    front = make_front(agent, site.server)
    agent.front_name = front.name
    agent.in_flight = lambda: front.in_flight
    grant_listeners: dict[str, object] = {}
    lock = threading.Lock()

    def grant_socket_path(gid: str) -> str:
        return grant_socket(socket_path, gid)

    def open_grant_socket(grant: Grant) -> str | None:
        path = grant_socket_path(grant.id)
        with lock:
            if grant.id not in grant_listeners:
                _claim(path)
                grant_listeners[grant.id] = front.listen_unix(path, "grant-socket", grant.id)
        return path

    def close_grant_socket(grant: Grant) -> None:
        with lock:
            lst = grant_listeners.pop(grant.id, None)
        if lst is not None:
            front.stop_listener(lst)
            _remove_socket(lst)

    agent.on_grant_created = open_grant_socket
    agent.on_grant_revoked = close_grant_socket
    def on_change(grant: Grant) -> None:
        # A revocation made elsewhere (another worker, another replica) closes the socket here too.
        if grant.revoked_at is not None:
            try:
                close_grant_socket(grant)
            except OSError:
                pass  # its grant is refused all the same

    store.on_change = on_change
    agent.grant_socket_path = grant_socket_path

    def close_all() -> None:
        agent.draining = True
        front.drain(DRAIN_TIMEOUT)
        for lst in [main, *grant_listeners.values()]:
            _remove_socket(lst)
        store.close()
        audit.close()

    try:
        main = front.listen_unix(socket_path, sock=sockets[0] if sockets else None)
    except BaseException:
        front.drain(0)
        store.close()
        raise
    try:
        if tcp_address:
            try:
                _tcp, (host, port) = front.listen_tcp(tcp_address, tls, sock=sockets[1] if sockets else None)
            except OSError as e:
                raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
            agent.listen_url = f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"
        # Grants' own sockets: one listener each, opened by the first worker at start; a worker
        # started again takes over those its dead predecessor served (nobody answers on them),
        # and while the store is away it tries again every second.
        if worker in (None, 0) and not restarted:
            take_over_grant_sockets(store, open_grant_socket, restarted=False)
        takeover = restarted  # done in the loop below, again every second while the store is away
    except BaseException:
        close_all()
        raise

    def on_signal(signum: int, frame: object) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Everything made so far (modules, the front, the store's connections) lives as long as
    # the process: out of the cyclic collector's sight. A full collection walked it all,
    # 25-50 ms with the event loop stopped, every few seconds under load (bench/fleet.py's
    # longest stall); now it walks what was made since, a fraction of a millisecond.
    gc.freeze()
    if ready is not None:
        ready()  # a worker: the parent prints the lines below once every worker is listening
    else:
        print(f"serving unix:{socket_path}", file=out)
        if agent.listen_url:
            print(f"serving {agent.listen_url}", file=out)
        print(f"ready pid={os.getpid()} org={agent.org} key={where} audit={audit.path} store={store.where} server={front.name}",
              file=out, flush=True)

    reason = "stopped"
    try:
        while not agent.stop.wait(0 if takeover else 1.0):
            if takeover:
                try:
                    take_over_grant_sockets(store, open_grant_socket, restarted)
                    takeover = False
                except StoreError:
                    agent.stop.wait(1.0)  # the store is away: this worker refuses meanwhile (check())
                    continue
            agent.publish_metrics()  # for the scrapes the other workers answer
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
        close_all()
    print(f"codestore agent exiting: {reason}", file=sys.stderr, flush=True)
    return 0


def take_over_grant_sockets(store: GrantStore, open_grant_socket: Callable[[Grant], str | None], restarted: bool) -> None:
    """Open a listener for every active grant's own socket nobody answers on (StoreError
    when the store cannot list them). At start one answering is a ConfigError (another
    agent has it); for a worker started again it is another worker's."""
    cursor: str | None = None
    while True:
        page, cursor = store.page(own_socket=True, state="active", after=cursor, limit=1000)
        for grant in page:
            try:
                open_grant_socket(grant)
            except ConfigError:
                if not restarted:
                    raise
        if cursor is None:
            return


def _stop_with_parent(parent: int) -> None:  # pragma: no cover - a forked worker
    """SIGTERM (a drain) for this worker when the parent dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a parent killed outright leaves its workers to the service manager
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(site: _Site, store: GrantStore, trust_store: TrustStore, i: int, parent: int,
            sockets: tuple[socket.socket, socket.socket | None], ready_fd: int | None, table: Table,
            dead: int | None = None) -> int:  # pragma: no cover - a forked worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops every worker
    _stop_with_parent(parent)
    try:
        store.catch_up()  # the view the parent had is a fork old (a restart's, maybe hours): refresh it before serving
    except StoreError as e:
        if ready_fd is not None:
            raise ConfigError(f"cannot start: {e}") from None  # at start: the agent refuses in one line
        # Started again while the store is away: serve anyway. The view is stale, so every
        # grant is refused (GrantStore.check, /readyz says why) until the poll catches up.
    if dead is not None:
        _recover_audit(site, store, {replica_of(dead)})  # what the worker it replaces had not flushed
    if site.key_uri:
        try:
            site.signer.reopen()  # type: ignore[union-attr]  # a PKCS#11 session of its own
        except ConfigError:
            if ready_fd is not None:
                raise  # at start: the agent refuses in one line
            # started again while the token is away: it signs once the token is back
            # (the signer reconnects), and /readyz says why it does not meanwhile
    ready = None if ready_fd is None else (lambda: (os.write(ready_fd, b"r"), None)[1])
    return _serve_one(site, store, trust_store, worker=i, sockets=sockets, ready=ready, metrics=Metrics(table, i),
                      restarted=ready_fd is None)


RESTART_BACKOFF = (0.1, 10.0)  # a worker that died is started again after the first, doubling to the second
CRASH_WINDOW = 60.0  # seconds: deaths closer together than this lengthen the wait before the next start


def _serve_workers(site: _Site, store: GrantStore, trust_store: TrustStore, n: int) -> int:
    """`--workers N`: N agent processes accepting from the same sockets, state in the shared store.

    The parent binds the sockets, opens the store once (its lock, its migrations, a bad
    store refused in one line) and closes its connections, then forks before any thread
    exists; each worker is a whole agent (`_serve_one`) on the inherited sockets, like a
    replica on the same machine: its own cache kept fresh by the store's poll, its own
    slot in the metrics table mapped here before the fork (so every worker's `/metrics`
    and `/v1/status` count the whole agent's tokens). The parent only supervises: a worker
    that stops cleanly (`agent stop`, its socket removed) stops the rest, as a signal to
    the parent does; a worker that dies (killed, a crash) is started again in its slot,
    forked from the parent as the first ones were, after a wait that doubles while deaths
    come close together, so one bad request or an OOM kill costs a worker for a moment,
    not the agent.
    """
    unix_sock = bind_unix(site.socket_path)
    try:
        tcp_sock = bind_tcp(site.tcp_address) if site.tcp_address else None
    except OSError as e:
        unix_sock.close()
        store.close()
        raise ConfigError(f"cannot listen on {site.listen}: {e.strerror}") from None
    store.db.close()  # no database connection crosses the fork: each worker opens its own
    table = Table(n)
    read_end, write_end = os.pipe()
    parent = os.getpid()
    live: dict[int, int] = {}  # pid -> worker slot

    def spawn(i: int, ready_fd: int | None, dead: int | None = None) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker process (covered by the end-to-end tests)
            code = 3
            try:
                if ready_fd is not None:  # the first start: the parent still reads the other end
                    os.close(read_end)
                work = functools.partial(_worker, site, store, trust_store, i, parent, (unix_sock, tcp_sock), ready_fd, table, dead)
                code = boundary("codestore", work)
            finally:
                os._exit(code)
        live[pid] = i

    for i in range(n):
        spawn(i, write_end)
    os.close(write_end)
    tcp_name = tcp_sock.getsockname()[:2] if tcp_sock is not None else None

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reap(deadline: float) -> None:
        # The parent's copies of the sockets close first: nothing queues for workers that are going.
        for sock in (unix_sock, tcp_sock):
            if sock is not None:
                sock.close()
        while live and time.monotonic() < deadline:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                live.pop(pid, None)
            else:
                time.sleep(0.05)
        if live:
            stop_all(signal.SIGKILL)
            while live:
                live.pop(os.waitpid(-1, 0)[0], None)

    ready = 0
    deadline = time.monotonic() + 60
    while ready < n:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid or time.monotonic() > deadline:
            live.pop(pid, None)
            stop_all()
            reap(time.monotonic() + DRAIN_TIMEOUT)
            os.close(read_end)
            store.close()
            raise ConfigError("a worker of the agent could not start (see the line above); nothing is serving")
        if select.select([read_end], [], [], 0.1)[0]:
            ready += len(os.read(read_end, 64))
    os.close(read_end)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out = site.out
    print(f"serving unix:{site.socket_path}", file=out)
    if tcp_name is not None:
        host, port = tcp_name
        print(f"serving {'https' if site.tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}", file=out)
    print(f"ready pid={os.getpid()} org={site.cfg.require_org()} key={site.where} audit={site.audit_file} store={store.where} server=uvicorn workers={n}",
          file=out, flush=True)
    deaths: list[float] = []
    while True:
        pid, status = os.wait()
        slot = live.pop(pid, None)
        if slot is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping or code == 0:  # a stop, asked for or decided by the worker: every worker goes
            break
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < CRASH_WINDOW] + [now]
        wait = min(RESTART_BACKOFF[0] * 2 ** (len(deaths) - 1), RESTART_BACKOFF[1])
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        print(f"codestore agent: worker {slot} (pid {pid}) {how}; starting it again in {wait:g}s", file=sys.stderr, flush=True)
        table.died(slot)
        until = now + wait
        while not stopping and time.monotonic() < until:
            time.sleep(0.05)  # a signal's handler runs between these and says whether to go on
        if stopping:
            break
        spawn(slot, None, pid)
    stop_all()
    reap(time.monotonic() + DRAIN_TIMEOUT + 5)
    store.close()
    print(f"codestore agent exiting: worker {pid} stopped", file=sys.stderr, flush=True)
    return 0 if code == 0 else 1
