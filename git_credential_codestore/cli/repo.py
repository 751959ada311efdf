"""`codestore repo create|list`: repositories, through the REST API."""

from __future__ import annotations

import click


@click.group("repo")
def repo_group() -> None:
    """Repositories, through the REST API."""


@repo_group.command("create")
@click.argument("repo")
@click.option("--default-branch", default="main", show_default=True)
def repo_create(repo: str, default_branch: str) -> None:
    """Create REPO (a repo:write token for that id only)."""
    from .. import api, config
    from ..source import get_token
    from ..vocab import TokenRequest, validate_repo_id

    cfg = config.load()
    validate_repo_id(repo)
    token = get_token(TokenRequest(repo, ("repo:write",), ttl=60), cfg)
    api.create_repo(cfg.api_url, token, default_branch)
    click.echo(f"created {repo}: {cfg.repo_url(repo)}")


@repo_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {repo_id, default_branch} (docs/json.md).")
def repo_list(as_json: bool) -> None:
    """List the org's repositories (an org:read token)."""
    from .. import api, config
    from ..source import get_token
    from ..vocab import TokenRequest

    cfg = config.load()
    token = get_token(TokenRequest("org", ("org:read",), ttl=60), cfg)
    repos = api.list_repos(cfg.api_url, token)
    if as_json:
        from . import echo_json

        echo_json([{"repo_id": r.get("repo_id"), "default_branch": r.get("default_branch")} for r in repos])
        return
    for r in repos:
        click.echo(f"{r.get('repo_id')}\t{r.get('default_branch', '')}")
