"""`codestore agent ...` and `codestore grant ...`: run the agent, manage its grants.

Grant commands are admin calls to a running agent over its own socket (the agent is
the only writer of the grant store, so a revocation takes effect at once); they never
send a grant, and the agent refuses them from anyone but its owner.
"""

from __future__ import annotations

import json
import os
import time

import click

from ..errors import CodestoreError, ConfigError

SOCKET_HELP = "Agent socket (default: $CODESTORE_AGENT_SOCK, else the user's runtime dir)."


def _socket_path(socket_opt: str | None) -> str:
    from .client import default_socket

    return os.path.abspath(os.path.expanduser(socket_opt or os.environ.get("CODESTORE_AGENT_SOCK") or default_socket()))


def _admin(socket_opt: str | None, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    from .client import Endpoint, call

    ep = Endpoint("unix", _socket_path(socket_opt))
    status, reply = call(ep, method, path, body)
    if status >= 300:
        raise CodestoreError(f"the agent refused: {reply.get('error') or status}")
    return reply


def parse_duration(value: str) -> int:
    """`90`, `45s`, `30m`, `8h`, `7d`, `2w` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    v = value.strip().lower()
    mult = units.get(v[-1:], None)
    num = v[:-1] if mult else v
    if not num.isdigit() or int(num) <= 0:
        raise ConfigError(f"bad duration {value!r}: use e.g. 3600, 30m, 8h, 7d")
    return int(num) * (mult or 1)


def _when(ts: object) -> str:
    if not isinstance(ts, int):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


# -- agent --------------------------------------------------------------------------------


@click.group("agent")
def agent() -> None:
    """The daemon that holds the key and mints tokens for helpers and sandboxes."""


@agent.command("serve")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--listen", metavar="HOST:PORT", help="Also serve grant holders over HTTP(S) (port 0: any free port).")
@click.option("--audit-log", metavar="PATH", help="Audit log file (default: in the state dir).")
@click.option("--tls-cert", metavar="PEM", help="Certificate for --listen (HTTPS).")
@click.option("--tls-key", metavar="PEM", help="Private key for --tls-cert.")
@click.option("--idle-timeout", type=int, default=0, show_default=True, help="Exit after this many idle seconds (0: never).")
@click.option("--state-dir", metavar="DIR", help="Where grants live (default: the user state dir).")
@click.option("--store", "store_url", metavar="URL", envvar="CODESTORE_AGENT_STORE",
              help="Grant database: postgresql://... shared by replicas (default: SQLite in the state dir).")
@click.option("--server", type=click.Choice(["auto", "uvicorn", "threads"]), default="auto", show_default=True, envvar="CODESTORE_AGENT_SERVER",
              help="HTTP front: uvicorn (the fleet extra) when installed, else the standard library's threads.")
def agent_serve(socket_opt: str | None, listen: str | None, audit_log: str | None, tls_cert: str | None,
                tls_key: str | None, idle_timeout: int, state_dir: str | None, store_url: str | None, server: str) -> None:
    """Run the agent in the foreground (containers, service managers)."""
    from .. import config
    from .server import serve

    serve(
        config.load(), os.environ,
        socket_path=os.path.expanduser(socket_opt) if socket_opt else (os.environ.get("CODESTORE_AGENT_SOCK") or None),
        listen=listen, audit_path=audit_log, tls_cert=tls_cert, tls_key=tls_key,
        idle_timeout=idle_timeout, state_dir=state_dir, store_url=store_url, server=server,
    )


@agent.command("start")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--listen", metavar="HOST:PORT", help="Also serve grant holders over HTTP(S).")
@click.option("--audit-log", metavar="PATH")
@click.option("--idle-timeout", type=int, default=0, show_default=True, help="Exit after this many idle seconds (0: never).")
def agent_start(socket_opt: str | None, listen: str | None, audit_log: str | None, idle_timeout: int) -> None:
    """Start the agent in the background (no-op when it is already running)."""
    from .client import AgentUnavailable, Endpoint, call, spawn
    from .server import default_state_dir

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
            raise CodestoreError(f"the agent exited at start: {last or 'see ' + log}")
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
    from .client import AgentUnavailable

    path = _socket_path(socket_opt)
    try:
        reply = _admin(socket_opt, "POST", "/v1/shutdown")
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
    s = _admin(socket_opt, "GET", "/v1/status")
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    g = s.get("grants") or {}
    assert isinstance(g, dict)
    click.echo(f"running    pid {s.get('pid')}, up {s.get('uptime')}s")
    click.echo(f"socket     {s.get('socket')}")
    if s.get("listen"):
        click.echo(f"listen     {s.get('listen')}")
    click.echo(f"signs for  org {s.get('org')}, kid {s.get('kid')}, key from {s.get('key')}")
    click.echo(f"grants     {g.get('active', 0)} active, {g.get('revoked', 0)} revoked, {g.get('expired', 0)} expired")
    click.echo(f"tokens     {s.get('mints')} minted, {s.get('refusals')} refused since start")
    click.echo(f"audit log  {s.get('audit_log')}")


# -- grant --------------------------------------------------------------------------------


@click.group("grant")
def grant() -> None:
    """Narrow, revocable permissions for sandboxes that must not hold the key."""


@grant.command("create")
@click.option("--repo", "repos", multiple=True, required=True, help="Repository id or glob (repeatable), e.g. team/app or team/*.")
@click.option("--scopes", "scopes", multiple=True, help='Scopes (default git:read), e.g. --scopes "git:read git:write".')
@click.option("--max-ttl", type=int, default=900, show_default=True, help="Longest token lifetime in seconds (<= 3600).")
@click.option("--expires-in", metavar="DURATION", help="The grant itself ends after this: 3600, 30m, 8h, 7d.")
@click.option("--ephemeral-only", is_flag=True, help="Only the +ephemeral namespace. Checked by the agent at mint time: a minted token itself can also write the default namespace until it expires; protect branches with --ref-policy.")
@click.option("--ref-policy", metavar="RULES", help="refs rules put in every token, e.g. 'refs/heads/main=no-push'.")
@click.option("--sub", metavar="ID", help="Identity stamped as `sub` in every token (default codestore-grant:<id>).")
@click.option("--own-socket", is_flag=True, help="Also serve this grant on a dedicated socket (mount it into a container).")
@click.option("--max-per-minute", type=click.IntRange(1, 1_000_000), help="At most this many tokens a minute, across all replicas.")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with `id` and `grant`).")
def grant_create(repos: tuple[str, ...], scopes: tuple[str, ...], max_ttl: int, expires_in: str | None,
                 ephemeral_only: bool, ref_policy: str | None, sub: str | None, own_socket: bool,
                 max_per_minute: int | None, socket_opt: str | None, as_json: bool) -> None:
    """Create a grant; its secret is printed once and stored only as a hash."""
    from ..config import parse_scopes

    body: dict[str, object] = {
        "repos": list(repos),
        "scopes": list(parse_scopes(" ".join(scopes) or "git:read", "--scopes")),
        "max_ttl": max_ttl,
        "expires_in": parse_duration(expires_in) if expires_in else None,
        "ephemeral_only": ephemeral_only,
        "sub": sub,
        "own_socket": own_socket,
        "max_per_minute": max_per_minute,
    }
    if ref_policy:
        from ..tokens import parse_ref_policy

        body["refs"] = [[p, ops] for p, ops in parse_ref_policy(ref_policy)]
    g = _admin(socket_opt, "POST", "/v1/grants", body)
    if g.get("warning"):
        click.echo(f"codestore: warning: {g['warning']}", err=True)
    if as_json:
        click.echo(json.dumps(g, indent=2))
        return
    click.echo(f"id:      {g['id']}")
    click.echo(f"grant:   {g['grant']}")
    if g.get("socket"):
        click.echo(f"socket:  {g['socket']}")
    click.echo(
        f"covers:  {' '.join(g['repos'])}  scopes {' '.join(g['scopes'])}  max ttl {g['max_ttl']}s"  # type: ignore[arg-type]
        f"{'  ephemeral only' if g['ephemeral_only'] else ''}  expires {_when(g['expires_at'])}"
    )
    click.echo("The grant is shown once: put it in the sandbox's CODESTORE_GRANT_FILE or CODESTORE_GRANT, never in a URL.", err=True)


@grant.command("revoke")
@click.argument("grant_id")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
def grant_revoke(grant_id: str, socket_opt: str | None) -> None:
    """Revoke a grant at once (tokens already minted end at their short expiry)."""
    if not grant_id.isalnum():
        raise ConfigError(f"{grant_id!r} is not a grant id; see: codestore grant list")
    g = _admin(socket_opt, "POST", f"/v1/grants/{grant_id.lower()}/revoke")
    if g.get("warning"):
        click.echo(f"codestore: warning: {g['warning']}", err=True)
    click.echo(f"revoked {g['id']} ({g['sub']}); it mints nothing from now on")


@grant.command("list")
@click.option("--repo", help="Only grants naming this repository pattern.")
@click.option("--sub", help="Only grants with this `sub`.")
@click.option("--state", type=click.Choice(["active", "revoked", "expired"]), help="Only grants in this state.")
@click.option("--limit", type=click.IntRange(1, 1000), help="One page of at most this many (the next page's --after is printed on stderr).")
@click.option("--after", metavar="CURSOR", help="Start after this cursor (from a previous --limit page).")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of grants.")
def grant_list(repo: str | None, sub: str | None, state: str | None, limit: int | None, after: str | None,
               socket_opt: str | None, as_json: bool) -> None:
    """Grants with their state, use count and last use (all of them, page by page, unless --limit)."""
    from urllib.parse import urlencode

    filters = {k: v for k, v in (("repo", repo), ("sub", sub), ("state", state)) if v}
    cursor, shown, first = after, 0, True
    if as_json:
        click.echo("[", nl=False)
    while True:
        query = {**filters, "limit": str(min(limit - shown, 1000) if limit else 1000), **({"after": cursor} if cursor else {})}
        reply = _admin(socket_opt, "GET", "/v1/grants?" + urlencode(query))
        grants, cursor = reply["grants"], reply.get("next_cursor")
        assert isinstance(grants, list)
        for g in grants:
            if as_json:
                click.echo(("" if first else ",") + "\n" + json.dumps(g), nl=False)
            else:
                if first:
                    click.echo(f"{'ID':<13} {'STATE':<8} {'USES':>5} {'REFUSED':>7}  {'LAST USE':<20}  {'SCOPES':<20} REPOS / SUB")
                click.echo(
                    f"{g['id']:<13} {g['state']:<8} {g['uses']:>5} {g['refusals']:>7}  {_when(g['last_use']):<20}  "
                    f"{' '.join(g['scopes']):<20} {' '.join(g['repos'])}{' (ephemeral only)' if g['ephemeral_only'] else ''} / {g['sub']}"
                )
            first = False
        shown += len(grants)
        if not cursor or (limit and shown >= limit):
            break
    if as_json:
        click.echo("\n]")
    elif first:
        click.echo("no grants match" if filters or after else "no grants; create one with: codestore grant create --repo REPO")
    if cursor and limit:
        click.echo(f"more: codestore grant list --limit {limit} --after {cursor}", err=True)
