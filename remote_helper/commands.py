"""`codestore clone` and `codestore promote`: conveniences around the remote helper.

    clone    a shallow, single-branch clone of codestore://org/repo, the sandbox's usual
             first step; --ephemeral-push points pushes at the +ephemeral namespace, so an
             untrusted sandbox never writes the default one.
    promote  copies a branch from the ephemeral namespace into the default one through
             the REST API (POST /api/v1/repos/branches/create). The plain-git way is
                 git fetch codestore://org/repo+ephemeral feat:feat && git push origin feat

Registered on the `codestore` CLI; click is imported there, and everything heavier
inside the command functions.
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
    import subprocess

    from git_credential_codestore import config, git
    from git_credential_codestore.errors import ConfigError, GitError

    from . import urls

    if "://" in spec and not spec.lower().startswith(urls.SCHEME):
        raise ConfigError("codestore clone takes ORG/REPO; for another URL use: git clone codestore::URL")
    url = spec if spec.lower().startswith(urls.SCHEME) else urls.SCHEME + spec
    remote, _ = urls.parse(url, config.load())
    org = url[len(urls.SCHEME) :].split("/", 1)[0]
    suffix = "+ephemeral" if remote.ephemeral else ""
    fetch_url = f"{urls.SCHEME}{org}/{remote.repo}{suffix}"
    target = directory or remote.repo.rsplit("/", 1)[-1]
    # Not git.run: the user should see git's progress as it happens, not after.
    try:
        status = subprocess.run(
            ["git", "clone", "--depth", "1", "--single-branch", "--", fetch_url, target],
            stdin=subprocess.DEVNULL,
        ).returncode
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH; install git 2.39 or newer") from None
    if status != 0:
        # git and the remote helper have already said why, one line each.
        raise click.exceptions.Exit(status)
    if ephemeral_push:
        push_url = f"{urls.SCHEME}{org}/{remote.repo}+ephemeral"
        git.run(["-C", target, "config", "remote.origin.pushurl", push_url])
        click.echo(f"pushes from {target} go to {push_url}; promote a branch with: codestore promote {remote.repo} <branch>")


@click.command("promote")
@click.argument("repo")
@click.argument("branch")
@click.option("--to", "target", metavar="BRANCH", help="Name in the default namespace [default: BRANCH].")
def promote(repo: str, branch: str, target: str | None) -> None:
    """Copy BRANCH of REPO's ephemeral namespace into its default namespace."""
    from git_credential_codestore import api, config
    from git_credential_codestore.config import validate_repo_id
    from git_credential_codestore.errors import PolicyError, RemoteError
    from git_credential_codestore.source import TokenRequest, get_token

    cfg = config.load()
    validate_repo_id(repo)
    target = target or branch
    if "git:write" not in cfg.scopes_for(repo, False):
        raise PolicyError(
            f"configuration forbids writing to {repo} in the default namespace, and promotion writes there; "
            'allow it with CODESTORE_SCOPES="git:read git:write"'
        )
    token = get_token(TokenRequest(repo, ("git:read", "git:write"), False, ttl=60, purpose="cli"), cfg)
    status, data = api.call(
        cfg.api_url,
        "POST",
        "/api/v1/repos/branches/create",
        token,
        {"base_ref": branch, "target_branch": target, "base_is_ephemeral": True, "target_is_ephemeral": False},
    )
    if not 200 <= status < 300:
        raise RemoteError(f"promoting {branch} of {repo} failed: {api.reason(status, data)}{api.hint(status)}")
    sha = data.get("commit_sha") or data.get("sha") or "?"
    click.echo(f"promoted {repo}+ephemeral {branch} -> {target} at {sha}")
