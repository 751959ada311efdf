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
    from ..source import get_token
    from ..vocab import TokenRequest, check_ttl, parse_scopes, validate_repo_id

    cfg = config.load()
    validate_repo_id(repo)
    wanted = parse_scopes(list(scopes), "--scope") if scopes else cfg.scopes_for(repo, ephemeral)
    token = get_token(TokenRequest(repo, wanted, ephemeral, check_ttl(ttl, "--ttl") if ttl else None), cfg)
    click.echo(token.reveal())
