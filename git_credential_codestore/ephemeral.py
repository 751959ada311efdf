"""The `+ephemeral` namespace workflow: clone with pushes sent there, and promotion.

    clone    a shallow, single-branch clone of codestore://org/repo, the sandbox's usual
             first step; `ephemeral_push` points pushes at the +ephemeral namespace, so
             an untrusted sandbox never writes the default one.
    promote  copies a branch from the ephemeral namespace into the default one through
             the REST API (POST /api/v1/repos/branches/create). The plain-git way is
                 git fetch codestore://org/repo+ephemeral feat:feat && git push origin feat
    promote_exact  (promote --expect-sha) promotes exactly the reviewed commit: it checks
             the branch is still at that SHA, then pushes *that SHA* (not the branch name)
             to the default namespace, so a sandbox push racing the promotion cannot slip
             a newer commit in. Both record a `promote` event in the audit trail.

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


def _require_promotion_allowed(cfg: Config, repo: str) -> None:
    """Promotion writes to the default namespace: refused here when configuration forbids that."""
    if "git:write" not in cfg.scopes_for(repo, False):
        raise PolicyError(
            f"configuration forbids writing to {repo} in the default namespace, and promotion writes there; "
            'allow it with CODESTORE_SCOPES="git:read git:write"'
        )


def promote(cfg: Config, repo: str, branch: str, target: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Copy BRANCH of REPO's ephemeral namespace into its default namespace; returns the commit."""
    from . import api
    from .source import get_token
    from .vocab import TokenRequest, validate_repo_id

    validate_repo_id(repo)
    target = target or branch
    _require_promotion_allowed(cfg, repo)
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
    sha = str(data.get("commit_sha") or data.get("sha") or "?")
    import sys

    from . import audit

    if not audit.is_sha(sha):
        # Done on the server, but its answer names no commit: nothing to record, and its
        # text is not ours to print (a terminal would act on what it holds).
        print(f"codestore: warning: the server promoted {branch} but did not say which commit; "
              f"check with: codestore branch list {repo}", file=sys.stderr)
        return "(a commit the server did not name)"
    warning = _record_promotion(cfg, env, repo, branch, target, None, sha, "ok", None)
    if warning:
        print(f"codestore: warning: {warning}", file=sys.stderr)
    return sha


def _record_promotion(cfg: Config, env: Mapping[str, str] | None, repo: str, branch: str, target: str,
                      old: str | None, new: str, result: str, expect: str | None, reason: str | None = None) -> str | None:
    """Record a promotion; returns a warning when the trail could not take it (the
    promotion itself has happened by then, and must not be reported as failed)."""
    from . import audit
    from .errors import CodestoreError
    from .source import choose_source

    ref: dict[str, object] = {"ref": f"refs/heads/{target}", "old": old or audit.ZERO, "new": new, "result": result}
    if reason:
        ref["reason"] = reason
    report = audit.validate_report({"event": "promote", "repo": repo, "ephemeral": False, "branch": branch,
                                    "target": target, "expect_sha": expect, "refs": [ref]})
    try:
        choose_source(cfg, env).record(report)
    except CodestoreError as e:
        return f"this promotion is not in the audit trail: {e}"
    return None


class Promoted(NamedTuple):
    sha: str
    target: str
    old: str | None  # the target's commit before, None when it is new
    warning: str | None = None


def promote_exact(cfg: Config, repo: str, branch: str, expect_sha: str, target: str | None = None,
                  env: Mapping[str, str] | None = None) -> Promoted:
    """Promote BRANCH of REPO+ephemeral only if it is still at EXPECT_SHA, and push that SHA.

    The check and the push are separate requests, and a sandbox may push between them;
    that cannot change the outcome, because what is pushed is the SHA itself, fetched
    into the review cache, never "whatever the branch holds now".
    """
    from . import audit, review
    from .vocab import validate_branch, validate_repo_id

    validate_repo_id(repo)
    validate_branch(branch)
    target = validate_branch(target or branch, "target")
    sha = expect_sha.strip().lower()
    if not audit.is_sha(sha):
        raise ConfigError(f"--expect-sha takes the full commit id that `codestore review {repo} {branch}` printed, not {expect_sha[:20]!r}")
    _require_promotion_allowed(cfg, repo)
    now = review.remote_heads(cfg, repo, True, env, f"refs/heads/{branch}").get(f"refs/heads/{branch}")
    if now is None:
        raise RemoteError(f"there is no branch {branch!r} in {repo}+ephemeral any more; nothing promoted")
    if now != sha:
        _record_promotion(cfg, env, repo, branch, target, None, sha, "error", sha, f"refused: {branch} moved to {now} since review")
        raise PolicyError(
            f"{repo}+ephemeral {branch} moved to {now[:12]} since the review of {sha[:12]}; nothing promoted; "
            f"review again: codestore review {repo} {branch}"
        )
    cache = review.cache_repo(cfg, repo, env)
    review.ensure_commit(cache, cfg, repo, branch, sha, env)
    old = review.remote_heads(cfg, repo, False, env, f"refs/heads/{target}").get(f"refs/heads/{target}")
    proc = git.run(["-C", cache, "push", "-q", "--no-verify", review.remote_url(cfg, repo, False),
                    f"{sha}:refs/heads/{target}"], env=env, ok=range(0, 256))
    if proc.returncode != 0:
        # git's reason: its "! [rejected] ... (fetch first)" line, else our helper's own line
        # ("codestore: ..."); never its "To codestore://..." line, which names only the remote.
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("To ")]
        why = next((ln for ln in lines if ln.startswith("!") and "rejected" in ln), None) \
            or next((ln for ln in lines if ln.startswith(("codestore:", "error:", "fatal:"))), lines[-1] if lines else "no output")
        _record_promotion(cfg, env, repo, branch, target, old, sha, "error", sha, why)
        from .errors import redact

        hint = "; the target moved on: review against it again" if "non-fast-forward" in why or "fetch first" in why else ""
        raise RemoteError(f"promoting {sha[:12]} to {repo} {target} failed: {redact(why)}{hint}")
    warning = _record_promotion(cfg, env, repo, branch, target, old, sha, "ok", sha)
    return Promoted(sha, target, old, warning)
