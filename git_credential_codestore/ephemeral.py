"""The `+ephemeral` namespace workflow: clone with pushes sent there, and promotion.

    clone    a shallow, single-branch clone of codestore://org/repo, the sandbox's usual
             first step; `ephemeral_push` points pushes at the +ephemeral namespace, so
             an untrusted sandbox never writes the default one.
    promote  copies a branch from the ephemeral namespace into the default one through
             the REST API (POST /api/v1/repos/branches/create). The plain-git way is
                 git fetch codestore://org/repo+ephemeral feat:feat && git push origin feat

`codestore clone` and `codestore promote` (cli/ephemeral.py) are thin layers over these.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import NamedTuple

from . import git, remotes
from .config import Config
from .errors import ConfigError, GitError, PolicyError, RemoteError


class Cloned(NamedTuple):
    status: int  # git clone's exit status
    directory: str
    repo: str
    push_url: str | None  # where pushes go, when sent to +ephemeral


def clone(
    spec: str, directory: str | None, ephemeral_push: bool, cfg: Config, env: Mapping[str, str] | None = None
) -> Cloned:
    """Clone ORG/REPO (or a codestore:// URL) shallow and single-branch."""
    if "://" in spec and not spec.lower().startswith(remotes.SCHEME):
        raise ConfigError("codestore clone takes ORG/REPO; for another URL use: git clone codestore::URL")
    url = spec if spec.lower().startswith(remotes.SCHEME) else remotes.SCHEME + spec
    remote, _ = remotes.parse(url, cfg)
    org = url[len(remotes.SCHEME) :].split("/", 1)[0]
    suffix = "+ephemeral" if remote.ephemeral else ""
    fetch_url = f"{remotes.SCHEME}{org}/{remote.repo}{suffix}"
    target = directory or remote.repo.rsplit("/", 1)[-1]
    # Not git.run: the user should see git's progress as it happens, not after.
    try:
        status = subprocess.run(
            ["git", "clone", "--depth", "1", "--single-branch", "--", fetch_url, target],
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        ).returncode
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH; install git 2.39 or newer") from None
    if status != 0 or not ephemeral_push:
        # On failure git and the remote helper have already said why, one line each.
        return Cloned(status, target, remote.repo, None)
    push_url = f"{remotes.SCHEME}{org}/{remote.repo}+ephemeral"
    git.run(["-C", target, "config", "remote.origin.pushurl", push_url], env=env)
    return Cloned(0, target, remote.repo, push_url)


def promote(cfg: Config, repo: str, branch: str, target: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Copy BRANCH of REPO's ephemeral namespace into its default namespace; returns the commit."""
    from . import api
    from .source import get_token
    from .vocab import TokenRequest, validate_repo_id

    validate_repo_id(repo)
    target = target or branch
    if "git:write" not in cfg.scopes_for(repo, False):
        raise PolicyError(
            f"configuration forbids writing to {repo} in the default namespace, and promotion writes there; "
            'allow it with CODESTORE_SCOPES="git:read git:write"'
        )
    token = get_token(TokenRequest(repo, ("git:read", "git:write"), False, ttl=60, purpose="cli"), cfg, env)
    status, data = api.call(
        cfg.api_url,
        "POST",
        "/api/v1/repos/branches/create",
        token,
        {"base_ref": branch, "target_branch": target, "base_is_ephemeral": True, "target_is_ephemeral": False},
    )
    if not 200 <= status < 300:
        raise RemoteError(f"promoting {branch} of {repo} failed: {api.reason(status, data)}{api.hint(status)}")
    return str(data.get("commit_sha") or data.get("sha") or "?")
