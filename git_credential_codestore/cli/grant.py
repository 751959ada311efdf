"""`codestore grant create|revoke|list`: narrow, revocable permissions for sandboxes.

Grant commands are admin calls to a running agent over its own socket (the agent is
the only writer of the grant store, so a revocation takes effect at once); they never
send a grant, and the agent refuses them from anyone but its owner.
"""

from __future__ import annotations

import json
import os
import time

import click

from ..errors import CodestoreError, ConfigError, for_terminal
from .agent import SOCKET_HELP, admin, admin_change, warn


def parse_duration(value: str) -> int:
    """`90`, `45s`, `30m`, `8h`, `7d`, `2w` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    v = value.strip().lower()
    mult = units.get(v[-1:], None)
    num = v[:-1] if mult else v
    if not (num.isascii() and num.isdigit()) or int(num) <= 0:  # "²".isdigit() is True
        raise ConfigError(f"bad duration {value!r}: use e.g. 3600, 30m, 8h, 7d")
    return int(num) * (mult or 1)


def _when(ts: object) -> str:
    if not isinstance(ts, int):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _words(values: object) -> str:
    """A JSON list from the agent (repos, scopes) as one space-separated line."""
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


# -- grant --------------------------------------------------------------------------------

PRINTABLE = ("id", "grant", "socket", "sub")


def _prepare_secret_file(path: str) -> str:
    """Check, before the grant exists, that its secret can be written to PATH.

    A grant created and then lost to an unwritable path would be a live secret nobody holds.
    """
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot write the grant to {path}: {parent} is not a directory; create it first")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write the grant to {path}: it is a directory; name a file")
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None  # dangling: the link alone is replaced
        if target is not None and not stat.S_ISREG(target.st_mode):
            # /dev/stdout -> /proc/self/fd/1: the link would be replaced by a file holding the secret.
            raise ConfigError(f"cannot write the grant to {path}: it leads to something that is not a regular file; "
                              "name a new file, or print the secret with --secret-only")
    elif st is not None and not stat.S_ISREG(st.st_mode):
        # Replaced by a rename, a device node (/dev/full) or a pipe would be gone.
        raise ConfigError(f"cannot write the grant to {path}: it is not a regular file; name a new file")
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size:
        with open(path, "rb") as f:
            held = f.read(4)
        if held != b"csg_":  # another grant's secret is replaced (a sandbox re-provisioned); anything else is kept
            raise ConfigError(f"cannot write the grant to {path}: it holds something else than a grant secret; "
                              "remove it or name a new file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the grant to {path}: {parent} is not writable")
    return path


def _write_secret(path: str, secret: str) -> None:
    """Write the secret to a fresh 0600 file and move it into place (never a symlink's target).
    CodestoreError if it cannot be; nothing of it is left behind then (files.write_atomic)."""
    from ..files import write_atomic

    try:
        write_atomic(path, secret + "\n", 0o600, fsync=True)
    except OSError as e:
        raise CodestoreError(f"cannot write the grant to {path}: {e.strerror}") from None


@click.group("grant")
def grant() -> None:
    """Narrow, revocable permissions for sandboxes that must not hold the key."""


@grant.command("create")
@click.option("--repo", "repos", multiple=True, required=True, help="Repository id or glob (repeatable), e.g. team/app or team/*.")
@click.option("--scopes", "scopes", multiple=True, help='Scopes (default git:read), e.g. --scopes "git:read git:write".')
@click.option("--max-ttl", type=int, default=900, show_default=True, help="Longest token lifetime in seconds (<= 3600).")
@click.option("--expires-in", metavar="DURATION", help="The grant itself ends after this: 3600, 30m, 8h, 7d.")
@click.option(
    "--ephemeral-only",
    is_flag=True,
    help=(
        "Only the +ephemeral namespace. Checked by the agent at mint time: a minted token itself can also "
        "write the default namespace until it expires; protect branches with --ref-policy."
    ),
)
@click.option("--ref-policy", metavar="RULES", help="refs rules put in every token, e.g. 'refs/heads/main=no-push'.")
@click.option("--sub", metavar="ID", help="Identity stamped as `sub` in every token (default codestore-grant:<id>).")
@click.option("--own-socket", is_flag=True, help="Also serve this grant on a dedicated socket (mount it into a container).")
@click.option("--max-per-minute", type=click.IntRange(1, 1_000_000), help="At most this many tokens a minute, across all replicas.")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with `id` and `grant`).")
@click.option("--secret-file", metavar="PATH", help="Write only the grant's secret to PATH (mode 0600); print the id.")
@click.option("--secret-only", is_flag=True, help="Print only the grant's secret (same as --print grant).")
@click.option("--print", "fields", multiple=True, type=click.Choice(PRINTABLE),
              help="Print only this field, one per line, in order (repeatable): id, grant (the secret), socket, sub.")
def grant_create(repos: tuple[str, ...], scopes: tuple[str, ...], max_ttl: int, expires_in: str | None,
                 ephemeral_only: bool, ref_policy: str | None, sub: str | None, own_socket: bool,
                 max_per_minute: int | None, socket_opt: str | None, as_json: bool, secret_file: str | None, secret_only: bool,
                 fields: tuple[str, ...]) -> None:
    """Create a grant; its secret is shown once and stored only as a hash.

    For scripts and recipes, without parsing JSON: `--secret-file PATH` puts the secret in
    a 0600 file and prints the id; `--secret-only` prints the secret alone;
    `--print id --print socket` prints just those values, one per line.
    """
    from ..vocab import parse_scopes

    fields = ("grant", *fields) if secret_only else fields
    if as_json and (fields or secret_file):
        raise ConfigError("--json prints everything; use it without --secret-only/--print/--secret-file")
    if secret_file and "grant" in fields:
        raise ConfigError("--secret-file already takes the secret; do not also print it")
    if "socket" in fields and not own_socket:
        raise ConfigError("--print socket needs --own-socket (only then has the grant a socket)")
    if secret_file:
        secret_file = _prepare_secret_file(secret_file)

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
        from ..vocab import parse_ref_policy, ref_policy_json

        body["refs"] = ref_policy_json(parse_ref_policy(ref_policy))
    g = admin(socket_opt, "POST", "/v1/grants", body)
    warn(g)
    if secret_file:
        try:
            _write_secret(secret_file, str(g["grant"]))
        except CodestoreError as e:
            # The secret was handed to nobody: a live grant nobody holds is revoked, not left.
            try:
                admin(socket_opt, "POST", f"/v1/grants/{g['id']}/revoke")
            except CodestoreError:
                raise CodestoreError(f"{e}; the grant {g['id']} could not be revoked: revoke it with codestore grant revoke {g['id']}") from None
            raise CodestoreError(f"{e}; the grant {g['id']} was revoked (its secret was never handed out)") from None
        fields = fields or ("id",)
    if fields:
        for f in fields:
            click.echo(str(g.get(f) or ""))
        return
    if as_json:
        click.echo(json.dumps(g, indent=2))
        return
    click.echo(f"id:      {g['id']}")
    click.echo(f"grant:   {g['grant']}")
    if g.get("socket"):
        click.echo(f"socket:  {g['socket']}")
    click.echo(
        f"covers:  {_words(g['repos'])}  scopes {_words(g['scopes'])}  max ttl {g['max_ttl']}s"
        f"{'  ephemeral only' if g['ephemeral_only'] else ''}  expires {_when(g['expires_at'])}"
    )
    click.echo("The grant is shown once: put it in the sandbox's CODESTORE_GRANT_FILE or CODESTORE_GRANT, never in a URL.", err=True)


@grant.command("revoke")
@click.argument("grant_id")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
def grant_revoke(grant_id: str, socket_opt: str | None) -> None:
    """Revoke a grant at once (tokens already minted end at their short expiry)."""
    g = admin_change(socket_opt, "grant", "grant", grant_id, "/v1/grants/{}/revoke")
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
        reply = admin(socket_opt, "GET", "/v1/grants?" + urlencode(query))
        grants, next_cursor = reply["grants"], reply.get("next_cursor")
        cursor = next_cursor if isinstance(next_cursor, str) else None
        assert isinstance(grants, list)
        for g in grants:
            if as_json:
                click.echo(("" if first else ",") + "\n" + json.dumps(g), nl=False)
            else:
                if first:
                    click.echo(f"{'ID':<13} {'STATE':<8} {'USES':>5} {'REFUSED':>7}  {'LAST USE':<20}  {'SCOPES':<20} REPOS / SUB")
                click.echo(for_terminal(
                    f"{g['id']:<13} {g['state']:<8} {g['uses']:>5} {g['refusals']:>7}  {_when(g['last_use']):<20}  "
                    f"{' '.join(g['scopes']):<20} {' '.join(g['repos'])}{' (ephemeral only)' if g['ephemeral_only'] else ''} / {g['sub']}"
                ))
            first = False
        shown += len(grants)
        if not cursor or (limit and shown >= limit):
            break
    if as_json:
        click.echo("\n]")
    elif first:
        click.echo("no grants match" if filters or after else "no grants; create one with: codestore grant create --repo REPO")
    if cursor and limit:
        import shlex

        # The same listing's next page: its filters, output and socket too (without them it was another listing's).
        again = [f"--{k} {shlex.quote(v)}" for k, v in filters.items()]
        again += [f"--socket {shlex.quote(socket_opt)}"] if socket_opt else []
        again += ["--json"] if as_json else []
        click.echo(for_terminal(f"more: codestore grant list {' '.join([*again, f'--limit {limit} --after {cursor}'])}"), err=True)
