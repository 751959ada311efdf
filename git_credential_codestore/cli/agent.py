"""`codestore agent serve|start|stop|status`: run the agent and ask it how it is.

Status and stop are admin calls to a running agent over its own socket (see `grant.py`
for the others); they never send a grant, and the agent refuses them from anyone but
its owner.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from ..errors import CodestoreError, ConfigError, for_terminal

SOCKET_HELP = "Agent socket (default: $CODESTORE_AGENT_SOCK, else the user's runtime dir)."


def require_unix_sockets() -> None:
    import _socket

    if not hasattr(_socket, "AF_UNIX"):
        # The agent is POSIX-only (Linux, macOS): its socket is a Unix socket.
        raise CodestoreError(
            "the agent listens on a Unix socket, which this platform lacks; run it on Linux or macOS "
            "and point this machine at it with CODESTORE_AGENT_URL (the helpers work here without it)"
        )


def _socket_path(socket_opt: str | None) -> str:
    require_unix_sockets()
    from ..agent.discovery import socket_path

    return socket_path(socket_opt)


def admin(socket_opt: str | None, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    from ..agent.client import Endpoint, call

    ep = Endpoint("unix", _socket_path(socket_opt))
    status, reply = call(ep, method, path, body)
    if status >= 300:
        raise CodestoreError(f"the agent refused: {reply.get('error') or status}")
    return reply


def warn(reply: dict[str, object]) -> None:
    """The agent committed the change; say what failed after it (the audit file, a socket), if anything."""
    if reply.get("warning"):
        click.echo(f"codestore: warning: {reply['warning']}", err=True)


def admin_change(socket_opt: str | None, what: str, group: str, oid: str, route: str) -> dict[str, object]:
    """POST one admin change to the grant or trust policy `oid` (`route`, its id in `{}`).

    The id is checked here first; what failed after the agent committed is said on stderr.
    """
    if not (0 < len(oid) <= 32 and all(c in "0123456789abcdef" for c in oid.lower())):
        # Not echoed: it may be a grant's secret given in the id's place (csg_<id>_...).
        hint = "; that looks like a grant's secret: revoke by its id (csg_<id>_...)" if oid.startswith("csg_") else ""
        raise ConfigError(f"that is not a {what} id (hex, as codestore {group} list shows){hint}")
    reply = admin(socket_opt, "POST", route.format(oid.lower()))
    warn(reply)
    return reply






class FiniteRange(click.FloatRange):
    """click.FloatRange, and a number: NaN compares false with both bounds, so it passed."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


@click.group("agent")
def agent() -> None:
    """The daemon that holds the key and mints tokens for helpers and sandboxes."""


@agent.command("serve")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--listen", metavar="HOST:PORT", help="Also serve grant holders over HTTP(S) (port 0: any free port).")
@click.option("--audit-log", metavar="PATH", help="Audit log file (default: in the state dir).")
@click.option("--tls-cert", metavar="PEM", help="Certificate for --listen (HTTPS).")
@click.option("--tls-key", metavar="PEM", help="Private key for --tls-cert.")
@click.option("--idle-timeout", type=click.IntRange(0), default=0, show_default=True, help="Exit after this many idle seconds (0: never).")
@click.option("--state-dir", metavar="DIR", help="Where grants live (default: the user state dir).")
@click.option("--store", "store_url", metavar="URL", envvar="CODESTORE_AGENT_STORE",
              help="Grant database: postgresql://... shared by replicas (default: SQLite in the state dir).")
@click.option("--server", type=click.Choice(["auto", "uvicorn", "threads"]), default="auto", show_default=True, envvar="CODESTORE_AGENT_SERVER",
              help="HTTP front: uvicorn (the fleet extra) when installed, else the standard library's threads.")
@click.option("--request-deadline", type=FiniteRange(0.5, 300), metavar="SECONDS",
              help="Longest a request may take from its first byte to its reply; slower clients are cut (default 15).")
@click.option("--key", "key_uri", metavar="pkcs11:URI", envvar="CODESTORE_AGENT_KEY",
              help="Sign through a PKCS#11 token (RFC 7512 URI) instead of holding the key in memory.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, envvar="CODESTORE_AGENT_WORKERS",
              help="Agent processes sharing the sockets (the fleet front; state in the shared store): one per core.")
def agent_serve(socket_opt: str | None, listen: str | None, audit_log: str | None, tls_cert: str | None,
                tls_key: str | None, idle_timeout: int, state_dir: str | None, store_url: str | None, server: str,
                request_deadline: float | None, key_uri: str | None, workers: int) -> None:
    """Run the agent in the foreground (containers, service managers)."""
    require_unix_sockets()
    from .. import config
    from ..agent.discovery import AGENT_SOCK
    from ..agent.server import serve

    serve(
        config.load(), os.environ,
        socket_path=os.path.expanduser(socket_opt) if socket_opt else (os.environ.get(AGENT_SOCK) or None),
        listen=listen, audit_path=audit_log, tls_cert=tls_cert, tls_key=tls_key,
        idle_timeout=idle_timeout, state_dir=state_dir, store_url=store_url, server=server,
        request_deadline=request_deadline, key_uri=key_uri, workers=workers,
    )


@agent.command("start")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--listen", metavar="HOST:PORT", help="Also serve grant holders over HTTP(S).")
@click.option("--audit-log", metavar="PATH")
@click.option("--idle-timeout", type=click.IntRange(0), default=0, show_default=True, help="Exit after this many idle seconds (0: never).")
def agent_start(socket_opt: str | None, listen: str | None, audit_log: str | None, idle_timeout: int) -> None:
    """Start the agent in the background (no-op when it is already running)."""
    from ..agent.client import AgentUnavailable, Endpoint, call
    from ..agent.discovery import spawn
    from ..agent.server import default_state_dir

    path = _socket_path(socket_opt)
    ep = Endpoint("unix", path)
    try:
        call(ep, "GET", "/v1/ping", timeout=3)
    except AgentUnavailable:
        pass
    else:
        click.echo(f"the agent is already running at {path}")
        return
    from .. import config, keys
    from ..agent.discovery import key_uri

    if not key_uri(os.environ):  # a pkcs11: key the agent opens itself (CODESTORE_AGENT_KEY, agent serve --key's variable)
        keys.load_private_key(config.load())  # say now, not in a log file, that there is no key
    extra: tuple[str, ...] = ()
    if listen:
        extra += ("--listen", listen)
    if audit_log:
        extra += ("--audit-log", audit_log)
    log = os.path.join(default_state_dir(), "agent.log")
    proc = spawn(path, idle_timeout=idle_timeout, extra=extra, log_path=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = ""
            try:
                with open(log, encoding="utf-8", errors="replace") as f:
                    last = (f.read().strip().splitlines() or [""])[-1]
            except OSError:
                pass
            raise CodestoreError(f"the agent exited at start: {last.removeprefix('codestore: ') or 'see ' + log}")
        try:
            call(ep, "GET", "/v1/ping", timeout=3)
        except CodestoreError:
            time.sleep(0.05)
            continue
        click.echo(f"agent started (pid {proc.pid}) at {path}")
        return
    raise CodestoreError(f"the agent did not come up within 20s; see {log}")


@agent.command("stop")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
def agent_stop(socket_opt: str | None) -> None:
    """Stop the agent (tokens already minted stay valid until their short expiry)."""
    from ..agent.client import AgentUnavailable

    path = _socket_path(socket_opt)
    try:
        reply = admin(socket_opt, "POST", "/v1/shutdown")
    except AgentUnavailable:
        click.echo(f"no agent is running at {path}")
        return
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    click.echo(f"agent stopped (pid {reply.get('pid')})")


@agent.command("status")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True)
def agent_status(socket_opt: str | None, as_json: bool) -> None:
    """Is the agent running; its socket, key, grants and counts."""
    s = admin(socket_opt, "GET", "/v1/status")
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    g = s.get("grants") or {}
    assert isinstance(g, dict)
    workers = s.get("workers") or 1
    click.echo(f"running    pid {s.get('pid')}" + (f", {workers} worker processes" if workers != 1 else "") + f", up {s.get('uptime')}s")
    click.echo(f"socket     {s.get('socket')}")
    if s.get("listen"):
        click.echo(f"listen     {s.get('listen')}")
    click.echo(f"signs for  org {s.get('org')}, kid {s.get('kid')}, key from {s.get('key')}")
    store_error = g.get("error")
    if store_error:  # the counts could not be read: not "0 active", which read as a store with no grant
        click.echo(for_terminal(f"grants     unknown: {store_error}"))
    else:
        click.echo(f"grants     {g.get('active', 0)} active, {g.get('revoked', 0)} revoked, {g.get('expired', 0)} expired")
    refused = s.get("refused") or {}
    assert isinstance(refused, dict)
    why = " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(refused.items())) + ")" if refused else ""
    every = f", summed over the {workers} workers" if workers != 1 else ""
    click.echo(f"tokens     {s.get('mints')} minted, {s.get('refusals')} refused{why} since start{every}")
    click.echo(f"audit log  {s.get('audit_log')}")
    if store_error:
        raise CodestoreError(f"the agent runs, but cannot read its grant store: {store_error}")
