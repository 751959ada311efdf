"""The agent's HTTP front for fleets: uvicorn's HTTP/1.1 protocol on asyncio (uvloop when installed).

uvicorn (with httptools, the llhttp parser) does the HTTP: request parsing, keep-alive
and its idle timeout, pipelining, flow control, the ASGI request/response cycle. The
agent's handler (`server.respond`) is plain synchronous code that may wait on the
database, so it runs on a bounded thread pool and the event loop never blocks on it;
except a token request the agent can answer at once (`Agent.answers_at_once`: a grant in
its cache, a key in memory), which is signed on the loop: handing it to a thread and
back cost more CPU than the mint itself, and the threads fought the loop for the GIL.
Such a request, as git's helpers send it (the whole request in one write, on a new
connection), is usually in the socket by the time the agent accepts it: `AsgiFront._serve`
reads it then, in the same loop callback as the accept, and answers it on the socket
itself, with no transport, protocol or timer made for the connection (together a sixth
of a token's CPU); the connections waiting together are taken through these steps together,
their tokens signed in a row (see `_serve`). Anything else (a request not yet there or not whole, another request,
TLS) goes on to a transport and `TokenProtocol`, which answers such a read likewise and
hands anything else to uvicorn (see its docstring).

Around uvicorn's protocol we keep what it does not do, each for a reason:

- a connection counts against its peer's fair share (PER_PEER per network address) from
  the moment it is accepted: our accept (`AsgiFront._ready`, on the listening socket's
  readiness) counts it before anything is read, or before the TLS handshake, which gets
  a deadline (IO_TIMEOUT) instead of asyncio's 60 s. Over the limit, a TLS connection is
  closed silently: a cleartext refusal on a TLS port only reads as a TLS error.
- a deadline per request (`--request-deadline`, from its first byte to its reply) on
  every listener, TLS included: uvicorn times out idle keep-alive connections but not a
  request that trickles in a byte at a time (issue 8 item 6).
- caps on the request target and the headers (uvicorn's httptools protocol has none),
  counted as bytes arrive: httptools holds a header's pieces until its line ends.
- the peer's uid (SO_PEERCRED) on Unix sockets, handed to the handler in the ASGI scope.

Helpers never import this module (nor uvicorn): they speak HTTP through `client.py`.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ..errors import redact
from .server import (
    IO_TIMEOUT,
    MAX_HEAD,
    Agent,
    Caller,
    Slots,
    admit,
    bind_tcp,
    bind_unix,
    encode,
    framing,
    identify,
    respond,
    respond_tokens,
    share,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

ACCEPT_BATCH = 64  # connections accepted per wake-up of a listener, before other work gets a turn
ACCEPT_GROUP = 16  # connections taken through _serve's steps together
# The first read of a connection, at accept: as much as the transport would have read
# (uvloop's read buffer). A token request is a few hundred bytes, but a request refused
# for its size must have been read whole: closing a socket with unread data resets the
# connection, and the client would read that instead of its 414.
READ_SIZE = 256 * 1024
WORKERS = 16  # threads running handlers; more only contend for the GIL
KEEPALIVE_IDLE = 5  # seconds an idle keep-alive connection is kept
PIPELINED = 16  # requests a connection may have waiting behind the one being answered; then it is closed after them


class _Slot:
    """One accepted connection's place in the counts; released exactly once."""

    __slots__ = ("front", "peer", "held")

    def __init__(self, front: AsgiFront, peer: str) -> None:
        self.front, self.peer, self.held = front, peer, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.front._release(self.peer)


class _Accepted:
    """A connection in AsgiFront._serve: what its steps found out."""

    __slots__ = ("conn", "slot", "caller", "read", "asked", "reply", "keep_alive")

    def __init__(self, conn: _socket.socket, slot: _Slot) -> None:
        self.conn, self.slot = conn, slot
        self.caller: Caller
        self.read = self.reply = b""
        self.asked: tuple[str | None, bytes, bool] | None = None  # a token request to answer (_token_request)
        self.keep_alive = False

    def close(self) -> None:
        self.conn.close()
        self.slot.release()


_BUSY = b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_ANSWERED = bytearray()  # a token request already answered (refused): ignore the rest of it
_STATUS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


def _response(status: int, data: bytes, ctype: str, keep_alive: bool) -> bytes:
    """A whole reply in one write: the status line, the headers the ASGI path sends, the body."""
    return b"".join((
        STATUS_LINE[status], b"content-type: ", ctype.encode(), b"\r\ncontent-length: ", b"%d" % len(data),
        b"\r\ncache-control: no-store\r\n", b"" if keep_alive else b"connection: close\r\n", b"\r\n", data))


def _admitted(agent: Agent, caller: Caller, header: Callable[[str], str | None]) -> tuple[bytes | None, int]:
    """(a refusal to send and close on, 0), or (None, the body's length): the ASGI path's checks."""
    refusal, length = admit(agent, caller), 0
    if refusal is None:
        refusal, length = framing(header)
    if refusal is not None:
        return _response(refusal[0], *encode(*refusal), keep_alive=False), 0
    return None, length


class _Read:
    """What the parser saw in one read (TokenProtocol's parser calls these)."""

    __slots__ = ("parser", "begun", "complete", "url", "headers", "head", "body", "post", "keep_alive")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.begun = self.complete = self.head = 0
        self.url = self.body = b""
        self.headers = _Headers({})
        self.post = self.keep_alive = False

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += len(name) + len(value) + 4
        self.headers.raw[name.lower()] = value

    def on_headers_complete(self) -> None:
        # The parser's answers hold for the message being parsed, not after it.
        parser = self.parser
        self.post = parser.get_method() == b"POST" and not parser.should_upgrade()
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def _token_request(agent: Agent, caller: Caller, data: bytes) -> tuple[str | None, bytes, bool] | bytes | None:
    """A read as exactly one whole token request the agent can answer at once: (its
    Authorization, its body, whether it may keep the connection), or a refusal (bytes) to
    send and close on; None for anything else (uvicorn's then)."""
    read = _Read()
    try:
        read.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # uvicorn answers these as it does
        return None
    header = read.headers.get
    authorization = header("authorization")
    if not (read.begun == 1 and read.complete == 1 and read.url == b"/v1/token" and read.post
            and read.head + len(read.url) <= MAX_HEAD and b"expect" not in read.headers.raw
            and agent.answers_at_once(caller, "POST", "/v1/token", authorization, read.body)):
        return None
    refusal, _ = _admitted(agent, caller, header)
    return refusal if refusal is not None else (authorization, read.body, read.keep_alive)


def _answer(agent: Agent, caller: Caller, data: bytes, may_keep_alive: bool) -> tuple[bytes, bool] | None:
    """(the reply, whether to keep the connection) to a read that holds exactly one whole
    token request the agent can answer at once; None for anything else (uvicorn's then)."""
    asked = _token_request(agent, caller, data)
    if asked is None or isinstance(asked, bytes):
        return None if asked is None else (asked, False)
    authorization, body, keep_alive = asked
    [(status, reply, ctype)] = respond_tokens(agent, [(caller, authorization, body)])
    keep_alive = keep_alive and may_keep_alive
    return _response(status, reply, ctype, keep_alive), keep_alive


class TokenProtocol(asyncio.Protocol):
    """A connection that `AsgiFront._serve` did not finish starts here: a read that holds
    exactly one whole token request the agent can answer at once (how git's helpers ask:
    one write, a new connection per token) is answered here (`_answer`, as _serve does);
    anything else goes to uvicorn.

    uvicorn's protocol costs more per connection than the rest of a token: a parser, two
    loggers, flow control and a scope per request, each callback in Python twice. This
    parses the read with the same parser (httptools' llhttp, in C), answers with the same
    checks (admit, framing) and handler (server.respond) as the ASGI path, and on anything
    else (another request, a request split across reads, two in one read, a parse error, an
    Upgrade, an Expect, a head over the caps) hands the connection to an AgentProtocol,
    which reads the same bytes again from the start: the read is the request's first byte
    up to its last, so nothing has been consumed. Keep-alive works across both: after a
    reply here the connection waits KEEPALIVE_IDLE for the next request, which starts
    again here. While the client does not read its replies (the transport's write buffer
    is over its mark), nothing more is read.
    """

    __slots__ = ("front", "listener", "caller", "slot", "transport", "_timer", "_handed", "_start", "_early")

    def __init__(self, front: AsgiFront, listener: _Listener, caller: Caller, slot: _Slot,
                 read: bytes = b"", reply: bytes = b"", keep_alive: bool = False) -> None:
        self.front, self.listener, self.caller, self.slot = front, listener, caller, slot
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handed = False
        # Where AsgiFront._serve left the connection: what it read and did not answer, or
        # the part of its reply the socket did not take (and whether to keep the connection).
        self._start = (read, reply, keep_alive)
        self._early = b""  # that read, until the loop's next turn (connection_made)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.front.waiting.add(self)
        (read, reply, keep_alive), self._start = self._start, (b"", b"", False)
        if reply or keep_alive:  # answered by _serve
            self._replied(reply, keep_alive)
            return
        self._set_timer(self.front.agent.request_deadline, transport.abort)
        if read:
            # Not from here: the transport starts reading when connection_made returns, so a
            # pause asked for while this read is parsed (uvicorn's, with pipelined requests
            # queued) was undone, and a client that never read its replies was read without end.
            self._early = read
            self.front.loop.call_soon(self._first)

    def _first(self) -> None:
        if self._early and self.transport is not None and not self.transport.is_closing():
            self.data_received(b"")

    def _set_timer(self, seconds: float, then: Callable[[], object]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.front.loop.call_later(seconds, then)

    def data_received(self, data: bytes) -> None:
        if self._early:  # the accept's read came first
            data, self._early = self._early + data, b""
        transport, caller = self.transport, self.caller
        assert transport is not None and caller is not None
        answer = _answer(self.front.agent, caller, data, not transport.is_closing())
        if answer is None:
            self._hand_over(data)
            return
        self._replied(*answer)

    def _replied(self, reply: bytes, keep_alive: bool) -> None:
        transport = self.transport
        assert transport is not None
        if reply:
            transport.write(reply)
        if keep_alive:
            self._set_timer(KEEPALIVE_IDLE, self._idle)  # idle: the next read arms the deadline again
        else:
            # A client that does not read its reply holds it no longer than a request may take.
            self._set_timer(self.front.agent.request_deadline, transport.abort)
            transport.close()

    def _idle(self) -> None:
        """Idle past KEEPALIVE_IDLE: closed, and aborted a deadline later if its replies are
        still unread (close() waits for the write buffer to drain, and a client that never
        reads held the connection, and its slot, for good)."""
        transport = self.transport
        if transport is not None:
            transport.close()
            self._set_timer(self.front.agent.request_deadline, transport.abort)

    def _hand_over(self, data: bytes) -> None:
        """The rest of the connection to uvicorn (AgentProtocol), this read first."""
        transport, caller, slot = self.transport, self.caller, self.slot
        assert transport is not None and caller is not None and slot is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handed = True
        self.front.waiting.discard(self)
        proto = self.front._protocol(self.listener, caller, slot)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # a client that does not read its replies gets no more

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self._early:  # a client that sent its request and shut its side before the loop's next turn
            self._first()
            if self._handed:
                return bool(self.transport.get_protocol().eof_received())  # type: ignore[union-attr]  # uvicorn's now
        return False  # nothing in progress here: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed:
            return  # refused (never counted), or AgentProtocol's from the hand-over on
        if self._timer is not None:
            self._timer.cancel()
        self.front.waiting.discard(self)
        if self.slot is not None:
            self.slot.release()

    def shutdown(self) -> None:
        """Draining: nothing is in progress between reads here, so close."""
        if self.transport is not None:
            self.transport.close()


class AgentProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request deadline, head caps and the caller in the scope.

    A connection comes here from TokenProtocol, counted and identified already."""

    def __init__(self, *, front: AsgiFront, listener: _Listener, deadline: float, caller: Caller, slot: _Slot,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.front = front
        self.agent = front.agent
        self.listener = listener
        self.caller: Caller | None = caller
        self.deadline = deadline
        self.slot = slot
        self._deadline: asyncio.TimerHandle | None = None
        self._head = 0
        self._error = 400
        self._heads = 0  # messages begun on this connection
        self._in_head = False  # between a message's first byte and its headers' end
        self._head_read = 0  # bytes read while one head is incomplete (see data_received)
        self._token: bytearray | None = None  # the body of a token request answered at once
        self._token_length = 0
        self._token_header: Callable[[str], str | None] = lambda name: None
        self._unanswered = 0  # messages begun and not answered: while any is, the deadline runs
        self._running: RequestResponseCycle | None = None  # see _start_asgi_task
        self._at_once = 0  # see on_headers_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        lst = self.listener
        address = transport.get_extra_info("peername") if lst.transport == "tcp" else None
        # HttpToolsProtocol.connection_made, with the addresses the listener already knows:
        # uvicorn asks the transport for a socket object twice and for its TLS context once
        # per connection, for scope fields the agent's handler does not read.
        self.connections.add(self)
        self.transport = transport
        self.flow = _Flow(transport)
        self.server = lst.address
        self.client = (str(address[0]), int(address[1])) if isinstance(address, tuple) else None
        self.scheme = "http" if lst.tls is None else "https"
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.flow.stopped:  # type: ignore[attr-defined]  # a _Flow (connection_made)
            return  # the parser stopped at the request over PIPELINED (send_400_response): nothing after it is served
        # Any byte starts the deadline, not only a message's first: uvicorn's keep-alive timer
        # stops at any read, and CRLFs between requests (which begin no message) sent once a
        # second held a connection open for good.
        self._arm()
        heads = self._heads
        self._at_once = 0  # token requests of this read answered on the loop (on_headers_complete)
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # httptools keeps a header's pieces until its line ends, and only then calls
            # on_header (where the cap is): a header that never ends grew, and was copied
            # on every read, until the request deadline. So the head is also counted as it
            # is read; from the read after the one it began in (that read may hold the end
            # of the request before), so at most one read more than MAX_HEAD is kept.
            self._head_read = self._head_read + len(data) if heads == self._heads else 0
            if self._head_read > MAX_HEAD:
                self._error = 431
                self.send_400_response("request head too large")

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.deadline, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self.transport.abort()  # however slowly it trickles in, a request ends here

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= PIPELINED:
            # uvicorn parses every request of a read (256 KiB: thousands of pipelined ones) into
            # its queue, and reads on after each reply: one connection grew the agent by GBs
            # and slowed every other client. The parser stops here (send_400_response).
            self._error = 0
            raise ValueError("too many pipelined requests")
        self._unanswered += 1
        super().on_message_begin()
        self._heads += 1
        self._in_head = True
        self._token = None
        # Not idle any more: a reply answered at once arms the keep-alive timeout while the
        # rest of the same read (a pipelined request) is still being parsed.
        self._unset_keepalive_if_required()
        self._head = 0
        self._arm()
        self.scope["extensions"] = {"codestore.caller": self.caller}  # type: ignore[dict-item]

    def on_url(self, url: bytes) -> None:
        self._head += len(url)
        if self._head > MAX_HEAD:
            self._error = 414
            raise ValueError("request target too long")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > MAX_HEAD:
            self._error = 431
            raise ValueError("request head too large")
        super().on_header(name, value)

    # -- the token fast path ------------------------------------------------------------------
    # A token request the agent can answer at once (Agent.answers_at_once) skips the ASGI
    # cycle (a task, an event, a scope, two writes per request): its body is gathered
    # here and answered when the parser says the message is complete, with the same
    # checks (admit, framing) and the same handler (server.respond) as the ASGI path. Any
    # other request, or a token request while an earlier one on this connection is still
    # being answered (pipelining keeps replies in order), goes through uvicorn unchanged.

    def on_headers_complete(self) -> None:
        self._in_head = False
        caller = self.caller
        # Only while the client reads its replies: the fast path writes at once, so a client
        # that pipelines and never reads would be answered into memory without bound; the
        # ASGI path waits for the write buffer to drain and stops reading meanwhile.
        # And PIPELINED of them a read at most: one read of pipelined token requests (256 KiB,
        # a thousand and more) was signed in one callback, a tenth of a second and more in
        # which no other client was served. The rest go through uvicorn, queued, and past
        # PIPELINED the connection is closed, as any other request's.
        if (caller is not None and self.url == b"/v1/token" and self.parser.get_method() == b"POST"
                and not self.expect_100_continue and (self.cycle is None or self.cycle.response_complete)
                and not self.flow.write_paused and self._at_once < PIPELINED):
            self._at_once += 1
            header = _headers(self.headers)
            if self.agent.answers_at_once(caller, "POST", "/v1/token", header("Authorization")):
                refusal, length = _admitted(self.agent, caller, header)
                if refusal is not None:
                    self._token = _ANSWERED
                    self.transport.write(refusal)
                    self._closing()
                else:
                    self._token, self._token_length, self._token_header = bytearray(), length, header
                return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._token is None:
            super().on_body(body)
        elif self._token is not _ANSWERED:
            self._token += body
            if len(self._token) > self._token_length:  # llhttp frames by Content-Length: never expected
                self._token = _ANSWERED
                self.transport.abort()

    def on_message_complete(self) -> None:
        if self._token is None:
            super().on_message_complete()
            return
        body, self._token = self._token, None
        if body is _ANSWERED or self.caller is None:
            return
        status, data, ctype = respond(self.agent, self.caller, "POST", "/v1/token", self._token_header, bytes(body))
        self._reply(status, data, ctype, keep_alive=self.parser.should_keep_alive())

    def _reply(self, status: int, data: bytes, ctype: str, keep_alive: bool) -> None:
        keep_alive = keep_alive and not self.transport.is_closing()
        self.transport.write(_response(status, data, ctype, keep_alive))
        if keep_alive:
            self.on_response_complete()
        else:
            self._closing()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol's contract: bool | None
        """The client closed its side (helpers send, then read): answer what is in flight, then close."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return True  # keep the transport open for our reply
        return False

    def on_response_complete(self) -> None:
        self._unanswered = max(0, self._unanswered - 1)
        self._disarm()  # uvicorn's keep-alive idle timeout takes over, when nothing else is begun
        super().on_response_complete()
        if self.transport.is_closing() or self._unanswered or self._in_head:
            # A request begun behind this one (pipelined, or its head still trickling in) has
            # a deadline of its own from here: it was this one's, which this reply ended. And a
            # connection closing (the last reply sent: close() waits for it to drain) is aborted
            # at its deadline if the client does not read it.
            self._arm()

    def _closing(self) -> None:
        """close(), and abort at the deadline if the client never reads what is written."""
        self.transport.close()
        self._arm()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()  # close(): it waits for unread replies to drain
        self._arm()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle  # the cycle answering now (self.cycle is the newest, maybe queued)
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.slot.release()
        # uvicorn marks only its newest cycle gone: the one still answering (behind queued
        # ones) wrote on, to a closed transport, and logged "Exception in ASGI application".
        for cycle in (self._running, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        status = self._error
        if status == 0 or self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            # Over PIPELINED (on_message_begin), or a bad request behind others still being
            # answered: those are answered, in order, then the connection is closed. A 400 now
            # went out first, and a client whose revoke went through was told it failed.
            assert isinstance(self.flow, _Flow)
            self.flow.stop_reading()
            queued = self.pipeline[0][0] if self.pipeline else self.cycle
            if queued is not None:
                queued.keep_alive = False
            return
        body = json.dumps({"error": f"bad request ({status} {_STATUS.get(status, b'').decode()})"}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _STATUS.get(status, b"Bad Request"), len(body), body)
        )
        self._closing()


class _Flow(FlowControl):
    """uvicorn's flow control, which can stop reading for good: uvicorn resumes reading after
    each reply and at each request's first wait for its body, and a connection that is to
    send no more requests (AgentProtocol.send_400_response) would be read, and its reads thrown away."""

    stopped = False

    def stop_reading(self) -> None:
        self.pause_reading()
        self.stopped = True

    def resume_reading(self) -> None:
        if not self.stopped:
            super().resume_reading()


class _Listener:
    def __init__(self, sock: socket.socket, transport: str, tls: ssl.SSLContext | None, bound_grant: str | None) -> None:
        self.sock = sock
        self.transport = transport
        self.tls = tls
        self.bound_grant = bound_grant
        self.family, self.kind = int(sock.family), int(sock.type)
        self.path = ""
        self.inode = 0
        name = sock.getsockname()  # the ASGI scope's "server", as uvicorn's get_local_addr gives it
        self.address: tuple[str, int | None] = (str(name[0]), int(name[1])) if isinstance(name, tuple) else (str(name), None)


class AsgiFront:
    """Listeners on one event loop in a thread of its own; `server.serve` drives it."""

    name = "uvicorn"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = Config(
            app=self.app, http="httptools", ws="none", lifespan="off", interface="asgi3", access_log=False,
            log_config=None, server_header=False, date_header=False, proxy_headers=False,
            timeout_keep_alive=KEEPALIVE_IDLE,
        )
        self.config.load()
        # uvicorn warns once or three times per malformed or upgrade request ("Invalid HTTP
        # request received.", "No supported WebSocket library detected..."): a line in the
        # agent's log at the rate of anyone who can connect. The client hears its 400; the
        # agent logs only errors (its own handler's are one line each: server.respond).
        logger = logging.getLogger("uvicorn.error")
        logger.setLevel(logging.ERROR)
        # What it does log (an ASGI application's exception, a write on a transport a client
        # closed meanwhile) is one line in the agent's log, as its own errors are: never a traceback.
        logger.handlers[:] = [_OneLine()]
        logger.propagate = False
        self.state = ServerState()
        self.app_state: dict[str, object] = {}
        self.executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="agent")
        self.slots = Slots()
        self._first = memoryview(bytearray(READ_SIZE))  # the accept's reads, copied out at once
        self.waiting: set[TokenProtocol] = set()  # connections between requests, not yet uvicorn's (drain closes them)
        self._listeners: list[_Listener] = []
        self.loop = _new_loop()
        self.loop.set_exception_handler(_one_line)
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-http", daemon=True)
        self._thread.start()

    # -- counts (on the loop thread only) -------------------------------------------------

    def _take(self, peer: str) -> _Slot | None:
        return _Slot(self, peer) if self.slots.take(peer) else None

    def _release(self, peer: str) -> None:
        self.slots.release(peer)

    @property
    def in_flight(self) -> int:
        return len(self.state.tasks)

    # -- the ASGI application ---------------------------------------------------------------

    async def app(self, scope: dict, receive: Callable, send: Callable) -> None:
        caller: Caller = scope["extensions"]["codestore.caller"]
        header = _headers(scope["headers"])
        refusal = admit(self.agent, caller)
        length = 0
        if refusal is None:
            refusal, length = framing(header)
        if refusal is not None:
            await self._send(send, refusal[0], *encode(*refusal), close=True)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > length:
                await self._send(send, 400, *encode(400, {"error": "body longer than its Content-Length"}), close=True)
                return
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        status, data, ctype = await self.loop.run_in_executor(
            self.executor, respond, self.agent, caller, scope["method"], target, header, body)
        await self._send(send, status, data, ctype)

    @staticmethod
    async def _send(send: Callable, status: int, data: bytes, ctype: str, close: bool = False) -> None:
        head = [(b"content-type", ctype.encode()), (b"content-length", str(len(data)).encode()), (b"cache-control", b"no-store")]
        if close:
            head.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": data})

    # -- accepting ----------------------------------------------------------------------------

    def _ready(self, lst: _Listener) -> None:
        """A listener is readable: accept what waits (ACCEPT_BATCH at most, then other work
        gets a turn), and serve it ACCEPT_GROUP connections at a time (_serve)."""
        accept, family, kind = lst.sock._accept, lst.family, lst.kind  # type: ignore[attr-defined]  # (fd, address): no wrapper
        group: list[tuple[_socket.socket, object]] = []
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and lst in self._listeners:
                    # Out of descriptors: let connections finish, then accept again.
                    self.loop.remove_reader(lst.sock.fileno())
                    self.loop.call_later(0.1, self._resume, lst)
                break
            # The C socket type: no Python-level wrapper, and no system call to make it.
            group.append((_socket.socket(family, kind, 0, fd), address))
            if len(group) == ACCEPT_GROUP:
                self._serve(group, lst)
                group = []
        if group:
            self._serve(group, lst)

    def _resume(self, lst: _Listener) -> None:
        if lst in self._listeners:
            self.loop.add_reader(lst.sock.fileno(), self._ready, lst)

    def _serve(self, group: list[tuple[_socket.socket, object]], lst: _Listener) -> None:
        """Accepted connections, each counted, identified and read (_open); those whose
        first read holds a whole token request the agent can answer at once (_ask) answered
        together (_answer_all: decided, their tokens signed one after another, then each
        audited); each reply sent (_write), or the connection handed to the loop with what
        was read (TLS connections: at once).

        A step at a time for the whole group, not a connection at a time: the system calls,
        the parser and policy in Python, and OpenSSL's signing each run with their code and
        tables still in the core's caches from the connection before. A connection at a
        time, each evicted the others' on these two-core machines (where the helpers asking
        run on the same cores): a signature took 75 us of the agent's CPU against 47 in a
        loop of signatures; 54 with the group's signed in a row.
        """
        opened = []
        for conn, address in group:
            slot = self._take(share(lst.transport, address, lst.bound_grant))
            if slot is None:
                if lst.tls is None:  # a cleartext refusal on a TLS port only reads as a TLS error
                    with contextlib.suppress(OSError):
                        conn.send(_BUSY, socket.MSG_DONTWAIT)
                conn.close()
                continue
            accepted = _Accepted(conn, slot)
            if self._step(accepted, self._open, address, lst):
                opened.append(accepted)
        asked = self._answer_all([accepted for accepted in opened if self._step(accepted, self._ask)])
        for accepted in asked:
            self._step(accepted, self._write, lst)

    def _step(self, accepted: _Accepted, step: Callable[..., bool], *args: object) -> bool:
        """One of _serve's steps for one connection: True to go on; on False, or if it
        fails, the connection is closed and its count released, here (the one place)."""
        try:
            if step(accepted, *args):
                return True
        except OSError:
            pass  # the peer is gone
        except Exception as e:  # noqa: BLE001 - a bug: said, and this connection closed, as a protocol's would be
            self.loop.call_exception_handler({"message": "agent: serving a connection failed", "exception": e})
        accepted.close()
        return False

    def _open(self, accepted: _Accepted, address: object, lst: _Listener) -> bool:
        conn = accepted.conn
        accepted.caller = identify(conn, address, lst.transport, lst.bound_grant)
        if lst.transport == "tcp":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if lst.tls is None:
            try:
                # Helpers write their request as they connect: it is usually here already.
                n = conn.recv_into(self._first, READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not n:
                return False  # closed before asking anything
            accepted.read = bytes(self._first[:n])
        return True

    def _ask(self, accepted: _Accepted) -> bool:
        asked = _token_request(self.agent, accepted.caller, accepted.read) if accepted.read else None
        if isinstance(asked, bytes):  # refused: send it and close
            accepted.reply, accepted.read = asked, b""
        else:
            accepted.asked = asked
        return True

    def _answer_all(self, group: list[_Accepted]) -> list[_Accepted]:
        """The group's token requests answered together (server.respond_tokens: their
        signatures in a row); returns the group's connections still open."""
        batch = [(accepted, accepted.asked) for accepted in group if accepted.asked is not None]
        if not batch:
            return group
        try:
            answers = respond_tokens(self.agent, [(accepted.caller, authorization, body) for accepted, (authorization, body, _) in batch])
        except Exception as e:  # noqa: BLE001 - a bug (each request's own are a 500): said, and these connections closed
            self.loop.call_exception_handler({"message": "agent: answering token requests failed", "exception": e})
            for accepted, _ in batch:
                accepted.close()
            return [accepted for accepted in group if accepted.asked is None]
        for (accepted, (_, _, keep_alive)), (status, body, ctype) in zip(batch, answers, strict=True):
            accepted.keep_alive = keep_alive
            accepted.reply, accepted.read = _response(status, body, ctype, keep_alive), b""
        return group

    def _write(self, accepted: _Accepted, lst: _Listener) -> bool:
        conn, reply = accepted.conn, accepted.reply
        if reply:
            try:
                reply = accepted.reply = reply[conn.send(reply, socket.MSG_DONTWAIT):]
            except (BlockingIOError, InterruptedError):
                pass
            if not reply and not accepted.keep_alive:
                return False  # answered
        # The rest on the loop: a TLS handshake, a request not (wholly) here yet or not
        # answered at once, a reply the socket did not take whole, a connection kept alive.
        sock = socket.socket(lst.family, lst.kind, 0, conn.detach())
        self.loop.create_task(self._start(sock, lst, accepted.slot, accepted.caller, accepted.read, reply, accepted.keep_alive))
        return True

    async def _start(self, conn: socket.socket, lst: _Listener, slot: _Slot, caller: Caller,
                     read: bytes, reply: bytes, keep_alive: bool) -> None:
        try:
            def factory() -> TokenProtocol:
                return TokenProtocol(self, lst, caller, slot, read, reply, keep_alive)

            handshake = min(IO_TIMEOUT, self.agent.request_deadline)
            await self.loop.connect_accepted_socket(factory, conn, ssl=lst.tls, ssl_handshake_timeout=handshake if lst.tls else None)
        except Exception:  # noqa: BLE001 - a failed handshake or a peer gone: nothing to serve
            slot.release()
            conn.close()

    def _protocol(self, lst: _Listener, caller: Caller, slot: _Slot) -> AgentProtocol:
        return AgentProtocol(config=self.config, server_state=self.state, app_state=self.app_state, _loop=self.loop,
                             front=self, listener=lst, caller=caller, slot=slot, deadline=self.agent.request_deadline)

    def _call(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _listen(self, lst: _Listener) -> None:
        lst.sock.setblocking(False)
        self.loop.add_reader(lst.sock.fileno(), self._ready, lst)
        self._listeners.append(lst)

    def listen_unix(self, path: str, transport: str = "socket", bound_grant: str | None = None,
                    sock: socket.socket | None = None) -> _Listener:
        """Serve on `path` (bound here, or already bound: `sock`, a worker's inherited socket)."""
        sock = sock or bind_unix(path)
        lst = _Listener(sock, transport, None, bound_grant)
        lst.path, lst.inode = path, os.stat(path).st_ino
        self._call(self._listen(lst))
        return lst

    def listen_tcp(self, address: tuple[str, int], tls: ssl.SSLContext | None,
                   sock: socket.socket | None = None) -> tuple[_Listener, tuple[str, int]]:
        sock = sock or bind_tcp(address)
        lst = _Listener(sock, "tcp", tls, None)
        self._call(self._listen(lst))
        return lst, sock.getsockname()[:2]

    async def _unlisten(self, lst: _Listener) -> None:
        if lst in self._listeners:
            self._listeners.remove(lst)
            if lst.sock.fileno() >= 0:
                self.loop.remove_reader(lst.sock.fileno())
        lst.sock.close()  # connections already accepted go on

    def stop_listener(self, lst: _Listener) -> None:
        self._call(self._unlisten(lst))

    async def _drain(self, timeout: float) -> None:
        for lst in list(self._listeners):
            await self._unlisten(lst)
        deadline = time.monotonic() + timeout
        while self.state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in [*self.state.connections, *self.waiting]:
            conn.shutdown()  # idle keep-alive connections close; a reply in progress finishes first
        while (self.state.connections or self.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def drain(self, timeout: float) -> None:
        """Stop accepting; let requests in flight finish (bounded); close the rest."""
        try:
            self._call(self._drain(timeout), timeout + 5)
        except Exception as e:  # noqa: BLE001 - shutting down regardless
            print(f"codestore agent: drain: {redact(repr(e))}", file=sys.stderr, flush=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _headers(raw: list[tuple[bytes, bytes]]) -> Callable[[str], str | None]:
    """A request's headers as the handler reads them: by name, any case (the last of repeats)."""
    return _Headers({k.lower(): v for k, v in raw}).get


class _Headers:
    """Headers by lowercased name, as bytes; read as text (latin-1) only when asked for."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self.raw = raw

    def get(self, name: str) -> str | None:
        value = self.raw.get(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")


def _say(what: str, error: BaseException | None) -> None:
    text = " ".join(f"{what}{f' ({error!r})' if error is not None else ''}".split())
    print(f"codestore agent: {redact(text)[:400]}", file=sys.stderr, flush=True)


class _OneLine(logging.Handler):
    """uvicorn's log records as one line each, with the exception's repr, not its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(f"uvicorn: {record.getMessage().splitlines()[0] if record.getMessage() else record.levelname}",
             record.exc_info[1] if record.exc_info else None)


def _one_line(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """The loop's exception handler: asyncio's default logs a traceback."""
    error = context.get("exception")
    _say(str(context.get("message") or "an event loop callback failed"), error if isinstance(error, BaseException) else None)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
