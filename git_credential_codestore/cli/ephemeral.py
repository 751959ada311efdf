"""`codestore clone` and `codestore promote`: the +ephemeral namespace workflow.

The work is in `git_credential_codestore.ephemeral`; these are its command lines.
"""

from __future__ import annotations

import click


@click.command("clone")
@click.argument("spec", metavar="ORG/REPO")
@click.argument("directory", required=False)
@click.option(
    "--ephemeral-push",
    is_flag=True,
    help="Send pushes to the +ephemeral namespace (remote.origin.pushurl).",
)
def clone(spec: str, directory: str | None, ephemeral_push: bool) -> None:
    """Clone ORG/REPO shallow and single-branch through codestore://."""
    from .. import ephemeral, remotes

    # The org in ORG/REPO picks its configuration, as the remote helper will.
    url = spec if spec.lower().startswith(remotes.SCHEME) else remotes.SCHEME + spec
    done = ephemeral.clone(spec, directory, ephemeral_push, remotes.config_for(url))
    if done.status != 0:
        # git and the remote helper have already said why, one line each.
        raise click.exceptions.Exit(done.status)
    if done.push_url:
        click.echo(
            f"pushes from {done.directory} go to {done.push_url}; promote a branch with: codestore promote {done.repo} <branch>"
        )


@click.command("promote")
@click.argument("repo")
@click.argument("branch")
@click.option("--to", "target", metavar="BRANCH", help="Name in the default namespace [default: BRANCH].")
@click.option("--expect-sha", metavar="SHA", help="Promote only if BRANCH is still at this reviewed commit, "
              "and push exactly it (see: codestore review REPO BRANCH).")
def promote(repo: str, branch: str, target: str | None, expect_sha: str | None) -> None:
    """Copy BRANCH of REPO's ephemeral namespace into its default namespace."""
    from .. import config, ephemeral

    if expect_sha is None:
        sha = ephemeral.promote(config.load(), repo, branch, target)
        click.echo(f"promoted {repo}+ephemeral {branch} -> {target or branch} at {sha}")
        return
    done = ephemeral.promote_exact(config.load(), repo, branch, expect_sha, target)
    was = f" (was {done.old[:12]})" if done.old else " (new branch)"
    click.echo(f"promoted {repo}+ephemeral {branch} -> {done.target} at {done.sha}{was}")
    if done.warning:
        click.echo(f"codestore: warning: {done.warning}", err=True)
