"""`codestore token REPO`: one token on stdout, for scripts and REST calls."""

from __future__ import annotations

import click

from ..vocab import MAX_TTL, MIN_TTL, SCOPES


@click.command("token")
@click.argument("repo")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(SCOPES), help="A scope (repeatable); default: the configured scopes.")
@click.option("--ttl", type=click.IntRange(MIN_TTL, MAX_TTL), help="Lifetime in seconds (default: configured, 300).")
@click.option("--ephemeral", is_flag=True, help="For the +ephemeral namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print the token's header and claims as JSON, not the token.")
@click.option("--include-token", is_flag=True, help="With --json: also put the token itself in the object.")
def token_cmd(repo: str, scopes: tuple[str, ...], ttl: int | None, ephemeral: bool, as_json: bool, include_token: bool) -> None:
    """Print one token for REPO (for scripts and REST calls)."""
    from .. import config
    from ..source import get_token
    from ..vocab import TokenRequest, parse_scopes, validate_repo_id

    if include_token and not as_json:
        raise click.UsageError("--include-token goes with --json")
    cfg = config.load()
    validate_repo_id(repo)
    wanted = parse_scopes(list(scopes), "--scope") if scopes else cfg.scopes_for(repo, ephemeral)
    token = get_token(TokenRequest(repo, wanted, ephemeral, ttl), cfg)
    if as_json:
        from ..tokens import unverified_parts
        from . import echo_json

        header, claims = unverified_parts(token)
        out: dict[str, object] = {"header": header, "claims": claims, "expires_at": token.expires_at}
        if include_token:
            out["token"] = token.reveal()
        echo_json(out)
        return
    click.echo(token.reveal())
