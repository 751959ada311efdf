"""`codestore review`: what a sandbox pushed to +ephemeral, against its base.

The work is in `git_credential_codestore.review`; this is its command line.
"""

from __future__ import annotations

import click


@click.command("review")
@click.argument("repo")
@click.argument("branch")
@click.option("--base", metavar="BRANCH", help="Compare with this branch of the default namespace "
              "[default: BRANCH there if it exists, else the default branch].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, for tools.")
@click.option("--no-pager", is_flag=True, help="Never page (a pager is used only on a terminal anyway).")
def review_cmd(repo: str, branch: str, base: str | None, as_json: bool, no_pager: bool) -> None:
    """Show what BRANCH of REPO+ephemeral adds: commits, diffstat, who pushed it, the SHA to promote."""
    import json

    from .. import audit, config, pager, review
    from ..vocab import validate_branch

    cfg = config.load()
    # Only the updates of this branch: a busy repository's mints must not crowd them out.
    trail, _ = audit.collect(audit.Query(repo=repo, ref=validate_branch(branch)), limit=2000)
    result = review.review(cfg, repo, branch, base, trail=trail)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    elif no_pager:
        click.echo(review.render(result), nl=False)
    else:
        pager.page(review.render(result))
