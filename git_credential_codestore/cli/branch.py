"""`codestore branch list|delete`: branches of both namespaces, through the REST API.

Cleaning up after a promotion: `codestore branch delete REPO feat --ephemeral`.
"""

from __future__ import annotations

import click

from ..errors import for_terminal


@click.group("branch")
def branch_group() -> None:
    """Branches of a repository, in the default and +ephemeral namespaces."""


@branch_group.command("list")
@click.argument("repo")
@click.option("--namespace", type=click.Choice(["all", "default", "ephemeral"]), default="all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list, for tools.")
def branch_list(repo: str, namespace: str, as_json: bool) -> None:
    """List REPO's branches (all pages; a git:read token)."""
    import json

    from .. import api, config
    from ..secrets import Token
    from ..source import get_token
    from ..vocab import TokenRequest, validate_repo_id

    cfg = config.load()
    validate_repo_id(repo)
    def token() -> Token:  # one a minute, as the listing goes on (api._pages)
        return get_token(TokenRequest(repo, ("git:read",), ttl=60), cfg)

    rows = []
    for ephemeral in {"all": (False, True), "default": (False,), "ephemeral": (True,)}[namespace]:
        for b in api.list_branches(cfg.api_url, token, ephemeral):
            rows.append({"name": b.get("name"), "head_sha": b.get("head_sha"), "ephemeral": ephemeral,
                         "created_at": b.get("created_at")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        # Names and ids are the server's answer (a sandbox named the branch): shown, never acted on.
        click.echo(f"{'+ephemeral' if r['ephemeral'] else 'default':<10}\t{for_terminal(str(r['name']))}\t{for_terminal(str(r['head_sha']))}")


@branch_group.command("delete")
@click.argument("repo")
@click.argument("branch")
@click.option("--ephemeral", is_flag=True, help="Delete it from the +ephemeral namespace (cleanup after promotion).")
def branch_delete(repo: str, branch: str, ephemeral: bool) -> None:
    """Delete BRANCH of REPO (a git:write token)."""
    from .. import api, config
    from ..source import get_token
    from ..vocab import TokenRequest, validate_branch, validate_repo_id

    cfg = config.load()
    validate_repo_id(repo)
    validate_branch(branch)
    token = get_token(TokenRequest(repo, ("git:read", "git:write"), ephemeral, ttl=60), cfg)
    api.delete_branch(cfg.api_url, token, repo, branch, ephemeral)
    click.echo(f"deleted {branch} from {repo}{'+ephemeral' if ephemeral else ''}")
