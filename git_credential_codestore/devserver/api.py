"""The REST endpoints, as Code Storage defines them (JSON in, JSON out, Bearer token).

- `POST /api/v1/repos`: create the repository named by the token's `repo` claim
  (scope `repo:write`); 201, or 409 when it exists.
- `GET /api/v1/repos`: list the org's repositories (scope `org:read`).
- `POST /api/v1/repos/branches/create`: create a branch from a base ref, either side
  in the ephemeral namespace (scope `git:write` for the token's repository). This is
  how an ephemeral branch is promoted.

Each handler takes verified claims and the parsed body and returns (status, JSON);
refusals raise `errors.Refused`, whose messages never hold a token.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigError, Refused
from ..tokens import Claims
from ..vocab import ref_ops, validate_repo_id
from .auth import require_scope
from .repos import RepoStore, check_branch

Json = dict[str, object]


def _bool(body: Mapping[str, object], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Refused(400, f"{key} must be true or false")
    return value


def create_repo(store: RepoStore, claims: Claims, body: Mapping[str, object], base_url: str) -> tuple[int, Json]:
    require_scope(claims, "repo:write")
    # The claim decides which repository is created; a body id may only repeat it.
    for key in ("id", "repo_id"):
        if key in body and body[key] != claims.repo:
            raise Refused(403, f"wrong repo: token is for repository {claims.repo[:200]!r}, not {str(body[key])[:200]!r}", claims)
    try:
        repo = validate_repo_id(claims.repo)
    except ConfigError as e:
        raise Refused(400, str(e)) from None
    branch = body.get("default_branch", "main")
    if not isinstance(branch, str):
        raise Refused(400, "default_branch must be a string")
    info = store.create(repo, branch)
    return 201, {
        "repo_id": info.repo_id,
        "url": f"{base_url}/{info.repo_id}.git",
        "default_branch": info.default_branch,
        "created_at": info.created_at,
    }


def list_repos(store: RepoStore, claims: Claims, query: Mapping[str, str], base_url: str) -> tuple[int, Json]:
    # org:read tokens are org-wide: the official SDK mints them with repo claim "org".
    require_scope(claims, "org:read")
    try:
        limit = int(query.get("limit", "1000"))
    except ValueError:
        raise Refused(400, "limit must be a whole number") from None
    if not 1 <= limit <= 1000:
        raise Refused(400, "limit must be between 1 and 1000")
    cursor = query.get("cursor") or ""
    needle = (query.get("q") or "").strip().lower()
    repos: list[Json] = []
    next_cursor = None
    for repo in store.all():
        if cursor and repo <= cursor:
            continue
        url = f"{base_url}/{repo}.git"
        if needle and needle not in url.lower():
            continue
        if len(repos) == limit:
            next_cursor = repos[-1]["repo_id"]
            break
        info = store.info(repo)
        repos.append({"repo_id": repo, "url": url, "default_branch": info.default_branch, "created_at": info.created_at})
    return 200, {"repos": repos, "next_cursor": next_cursor}


def create_branch(store: RepoStore, claims: Claims, body: Mapping[str, object]) -> tuple[int, Json]:
    """Create `target_branch` at `base_ref`.

    The least surprising rule for an existing target: if it already points at the base
    commit the call succeeds (retries are safe); otherwise 409, even when moving it would
    be a fast-forward. "Create" never moves a branch: updating one is a `git push`,
    where the token's ref policy and the reviewer's expectations already apply.
    """
    require_scope(claims, "git:write")
    try:
        repo = validate_repo_id(claims.repo)
    except ConfigError as e:
        raise Refused(400, str(e)) from None
    if not store.exists(repo):
        raise Refused(404, f"repository {repo!r} does not exist")
    base = body.get("base_ref", body.get("base_branch"))
    if not isinstance(base, str) or not base.strip():
        raise Refused(400, "base_ref is required")
    base = base.strip()
    target = body.get("target_branch")
    if not isinstance(target, str) or not target.strip():
        raise Refused(400, "target_branch is required")
    target = check_branch(target.strip(), "target_branch")
    if base.startswith("refs/"):
        check_branch(base[len("refs/") :], "base_ref")
    else:
        check_branch(base, "base_ref")
    base_eph, target_eph = _bool(body, "base_is_ephemeral"), _bool(body, "target_is_ephemeral")
    target_ref = f"refs/heads/{target}"
    if "no-push" in ref_ops(claims.refs, target_ref):
        raise Refused(403, f"{target_ref}: the token's ref policy forbids pushing to it (no-push)", claims)
    sha = store.resolve(repo, base, base_eph)
    if sha is None:
        where = "the ephemeral namespace" if base_eph else "the default namespace"
        raise Refused(404, f"base ref {base!r} not found in {where} of {repo!r}")
    if not store.create_branch(repo, target, sha, target_eph):
        existing = store.branch_sha(repo, target, target_eph)
        if existing != sha:
            raise Refused(409, f"branch {target!r} already exists at another commit; push to update it")
    return 200, {
        "message": "branch created",
        "target_branch": target,
        "target_is_ephemeral": target_eph,
        "commit_sha": sha,
    }
