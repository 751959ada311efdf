"""`codestore token REPO`: one token on stdout, for scripts and REST calls."""

from __future__ import annotations

import click


@click.command("token")
@click.argument("repo")
@click.option("--scope", "scopes", multiple=True, help="A scope (repeatable); default: the configured scopes.")
@click.option("--ttl", type=int, help="Lifetime in seconds (default: configured, 300).")
@click.option("--ephemeral", is_flag=True, help="For the +ephemeral namespace.")
def token_cmd(repo: str, scopes: tuple[str, ...], ttl: int | None, ephemeral: bool) -> None:
    """Print one token for REPO (for scripts and REST calls)."""
    from .. import config
    from ..config import parse_scopes, parse_ttl, validate_repo_id
    from ..source import TokenRequest, get_token

    cfg = config.load()
    validate_repo_id(repo)
    wanted = parse_scopes(list(scopes), "--scope") if scopes else cfg.scopes_for(repo, ephemeral)
    token = get_token(TokenRequest(repo, wanted, ephemeral, parse_ttl(ttl, "--ttl") if ttl else None), cfg)
    click.echo(token.reveal())
