"""`codestore repo create|list|delete`: repositories, through the REST API."""

from __future__ import annotations

import click

from ..errors import for_terminal


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
    """List every repository of the org (all pages; an org:read token)."""
    from .. import api, config
    from ..source import get_token
    from ..vocab import TokenRequest

    cfg = config.load()
    repos = api.list_repos(cfg.api_url, lambda: get_token(TokenRequest("org", ("org:read",), ttl=60), cfg))  # renewed as pages go on
    if as_json:
        from . import echo_json

        echo_json([{"repo_id": r.get("repo_id"), "default_branch": r.get("default_branch")} for r in repos])
        return
    for r in repos:
        click.echo(f"{for_terminal(str(r.get('repo_id')))}\t{for_terminal(str(r.get('default_branch', '')))}")


@repo_group.command("delete")
@click.argument("repo")
@click.option("--yes", is_flag=True, help="Do not ask; required when stdin is not a terminal.")
def repo_delete(repo: str, yes: bool) -> None:
    """Delete REPO and everything in it (a repo:write token for that id only)."""
    import sys

    from .. import api, config
    from ..errors import UsageError
    from ..source import get_token
    from ..vocab import TokenRequest, validate_repo_id

    cfg = config.load()
    validate_repo_id(repo)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"deleting {repo} cannot be undone; confirm with: codestore repo delete {repo} --yes")
        click.confirm(f"Delete {repo} and all its branches, in both namespaces? This cannot be undone", abort=True)
    token = get_token(TokenRequest(repo, ("repo:write",), ttl=60), cfg)
    api.delete_repo(cfg.api_url, token, repo)
    click.echo(f"deleted {repo}")
