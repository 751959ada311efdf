"""The REST API, as Code Storage defines it (JSON in, JSON out, Bearer token).

Every endpoint the official SDK calls is in `ENDPOINTS`, under both of its spellings:
the released SDK's `/api/v1/repos/...` (the repository is the token's `repo` claim) and
the SDK main line's versionless `/api/repos/{url-encoded id}/...`. An endpoint without a
handler answers 501 naming the SDK method, never 404, so a test against the dev server
fails loudly where Code Storage would have answered. A request field or query parameter
a handler does not know is a 400 that names it: nothing the caller asked for is
silently dropped.

Security reasoning, route by route (the server authenticates before routing reveals
anything, then checks the scope below, then the repository):

- `POST repos` (repo:write) creates the repository named by the claim; a body or path id
  may only repeat it. A fork (`base_repo` from this org) needs a second token, `git:read`
  for the source, exactly as the SDK mints it: holding repo:write for a new id must not
  be a way to read another repository.
- `GET repos` (org:read) lists the org; org:read tokens may name no repository at all.
- `GET repo` / `GET repos/{id}` (git:read): a repository that exists is no secret from
  someone who may read it; to anyone else the answer is the same 401/403 whether it
  exists or not.
- `DELETE repos/delete` / `DELETE repos/{id}` (repo:write): the claim names the victim.
- Branches: list (git:read); create and delete (git:write, and the token's ref policy
  applies exactly as on push: `no-push` forbids both, `no-force-push` forbids deleting
  and forced moves). The REST API must not be a way around the policy a push would meet.
- Commits, the branch diff, files (git:read): read-only views of what a clone shows.
- In the versionless form the path's repository must be the claim's (403 otherwise): the
  path only says which repository the caller means, the token says which it may touch.
- Ids in the path are decoded once and then must pass `vocab.validate_repo_id`: an encoded `..`
  or `/` cannot reach another directory, and `%25` cannot smuggle a second decoding.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import unquote

from ..errors import ConfigError, Refused, TokenError
from ..tokens import Claims, PublicKey, verify
from ..vocab import ref_ops, validate_repo_id
from .auth import require_scope
from .repos import RepoStore, check_branch

Json = dict[str, object]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


@dataclass
class Call:
    """One authenticated REST request, as a handler sees it."""

    store: RepoStore
    claims: Claims
    repo: str  # the repository the call is about ("" for org-level calls)
    query: Sequence[tuple[str, str]]
    body: Mapping[str, object]
    headers: Message  # the request's (case-insensitive) headers
    method: str
    base_url: str
    org: str = ""
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return None

    def params(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]

    def flag(self, name: str) -> bool:
        value = self.param(name)
        if value is None or value == "false":
            return False
        if value == "true":
            return True
        raise Refused(400, f"{name} must be true or false")

    def limit(self) -> int:
        raw = self.param("limit")
        if raw is None or raw == "":
            return DEFAULT_LIMIT
        if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
            raise Refused(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return min(int(raw), MAX_LIMIT)  # Code Storage caps rather than refuses

    def only(self, query: Sequence[str] = (), body: Sequence[str] = ()) -> None:
        """Refuse what this handler would otherwise ignore."""
        for k, _ in self.query:
            if k not in query:
                raise Refused(400, f"query parameter {k[:40]!r} is not supported by the dev server")
        for k in self.body:
            if k not in body:
                raise Refused(400, f"field {str(k)[:40]!r} is not supported by the dev server")


@dataclass
class Reply:
    status: int
    json: Json | None = None
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    ctype: str = "application/json"


Handler = Callable[[Call], Reply]


def _bool(body: Mapping[str, object], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Refused(400, f"{key} must be true or false")
    return value


def _str(body: Mapping[str, object], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused(400, f"{key} must be a string")
    return value.strip() or None


def _exists(call: Call) -> str:
    if not call.store.exists(call.repo):
        raise Refused(404, f"repository {call.repo!r} does not exist")
    return call.repo


def _info(call: Call, repo: str) -> Json:
    info = call.store.info(repo)
    return {"repo_id": repo, "url": f"{call.base_url}/{repo}.git", "default_branch": info.default_branch, "created_at": info.created_at}


def _ref_arg(value: str, what: str) -> str:
    """A branch, tag, full ref, commit id or HEAD as a caller may name one; never an option or a range."""
    if value == "HEAD":  # the one name that is not a branch name and still resolves
        return value
    if value.startswith("refs/"):
        check_branch(value[len("refs/") :], what)
    else:
        check_branch(value, what)
    return value


def _resolve(call: Call, repo: str, ref: str | None, ephemeral: bool, what: str) -> tuple[str, str]:
    """(name as given or the default branch, commit sha); 404 when it does not resolve."""
    name = ref or call.store.info(repo).default_branch
    sha = call.store.resolve(repo, _ref_arg(name, what), ephemeral)
    if sha is None:
        where = "the ephemeral namespace" if ephemeral else "the default namespace"
        raise Refused(404, f"{what} {name!r} not found in {where} of {repo!r}")
    return name, sha


def _policy_refuses(claims: Claims, ref: str, forced: bool) -> str | None:
    ops = ref_ops(claims.refs, ref)
    if "no-push" in ops:
        return f"{ref}: the token's ref policy forbids pushing to it (no-push)"
    if forced and "no-force-push" in ops:
        return f"{ref}: the token's ref policy forbids deleting or rewriting it (no-force-push)"
    return None


# ---- repositories -------------------------------------------------------------------------


def create_repo(call: Call) -> Reply:
    call.only(body=("default_branch", "base_repo", "initial_commit", "id", "repo_id"))
    for key in ("id", "repo_id"):
        if key in call.body and call.body[key] != call.repo:
            raise Refused(403, f"wrong repo: token is for repository {call.repo[:200]!r}, not {str(call.body[key])[:200]!r}", call.claims)
    try:
        repo = validate_repo_id(call.repo)
    except ConfigError as e:
        raise Refused(400, str(e)) from None
    if call.body.get("initial_commit") is not None:
        raise Refused(400, "initial_commit (snapshot create) cannot be honoured by the dev server; create the repository and push the commit")
    branch = call.body.get("default_branch")
    if branch is not None and not isinstance(branch, str):
        raise Refused(400, "default_branch must be a string")
    base = call.body.get("base_repo")
    if base is not None:
        return _fork(call, repo, base, branch)
    info = call.store.create(repo, branch or "main")
    return Reply(201, _info(call, info.repo_id))


def _fork(call: Call, repo: str, base: object, branch: str | None) -> Reply:
    """`base_repo` with `provider: code`, `operation: fork`: a copy of one of this org's repositories."""
    if not isinstance(base, dict):
        raise Refused(400, "base_repo must be an object")
    provider, operation = base.get("provider"), base.get("operation")
    if provider != "code" or operation != "fork":
        raise Refused(
            400,
            f"base_repo provider {str(provider)[:40]!r} operation {str(operation)[:40]!r} cannot be honoured by the dev server "
            "(it reaches no other host); only forks of this org's repositories are served",
        )
    unknown = set(base) - {"provider", "operation", "owner", "name", "auth", "ref", "sha"}
    if unknown:
        raise Refused(400, f"base_repo field {sorted(unknown)[0][:40]!r} is not supported by the dev server")
    source = base.get("name")
    auth = base.get("auth")
    token = auth.get("token") if isinstance(auth, dict) else None
    if not isinstance(source, str) or not isinstance(token, str):
        raise Refused(400, "base_repo needs name (the source repository) and auth.token (a git:read token for it)")
    if base.get("owner") not in (None, call.org):
        raise Refused(400, f"base_repo owner {str(base.get('owner'))[:60]!r} is not this org {call.org!r}")
    try:
        source_claims = verify(token, call.keys, org=call.org)
    except TokenError as e:
        raise Refused(401, f"base_repo.auth.token: {e}", call.claims) from None
    if source_claims.repo != source:
        raise Refused(403, f"base_repo.auth.token is for repository {source_claims.repo[:200]!r}, not {source[:200]!r}", call.claims)
    require_scope(source_claims, "git:read")
    try:
        validate_repo_id(source)
    except ConfigError as e:
        raise Refused(400, str(e)) from None
    if not call.store.exists(source):
        raise Refused(404, f"base repository {source!r} does not exist")
    ref, sha = _str(base, "ref"), _str(base, "sha")
    start = None
    if sha is not None or ref is not None:
        start = call.store.resolve(source, _ref_arg(sha or ref or "", "base_repo.sha" if sha else "base_repo.ref"), False)
        if start is None:
            raise Refused(404, f"base_repo {'sha' if sha else 'ref'} {(sha or ref)!r} not found in {source!r}")
    default = branch or (ref if ref and not ref.startswith("refs/") else None) or call.store.info(source).default_branch
    info = call.store.create(repo, check_branch(default, "default_branch"), source=source, start=start)
    return Reply(201, _info(call, info.repo_id))


def list_repos(call: Call) -> Reply:
    call.only(query=("cursor", "limit", "q"))
    limit = call.limit()
    cursor = call.param("cursor") or ""
    needle = (call.param("q") or "").strip().lower()
    repos: list[Json] = []
    has_more = False
    for repo in call.store.all():
        if cursor and repo <= cursor:
            continue
        url = f"{call.base_url}/{repo}.git"
        if needle and needle not in url.lower():
            continue
        if len(repos) == limit:
            has_more = True
            break
        repos.append(_info(call, repo))
    next_cursor = repos[-1]["repo_id"] if has_more else None
    return Reply(200, {"repos": repos, "next_cursor": next_cursor, "has_more": has_more})


def find_one(call: Call) -> Reply:
    call.only()
    return Reply(200, _info(call, _exists(call)))


def delete_repo(call: Call) -> Reply:
    call.only()
    call.store.delete(_exists(call))
    return Reply(200, {"repo_id": call.repo, "message": "repository deleted"})


# ---- branches -------------------------------------------------------------------------------


def list_branches(call: Call) -> Reply:
    call.only(query=("cursor", "limit", "ephemeral"))
    repo, limit, cursor = _exists(call), call.limit(), call.param("cursor") or ""
    rows = [r for r in call.store.branches(repo, call.flag("ephemeral")) if not cursor or r[0] > cursor]
    page, has_more = rows[:limit], len(rows) > limit
    branches = [
        # Code Storage records when a branch was created; a git repository does not, so
        # the dev server reports its head commit's time (documented in docs/dev-server.md).
        {"cursor": name, "name": name, "head_sha": sha, "created_at": _iso(when)}
        for name, sha, when in page
    ]
    return Reply(200, {"branches": branches, "next_cursor": page[-1][0] if has_more else None, "has_more": has_more})


def create_branch(call: Call) -> Reply:
    """Create `target_branch` at `base_ref`; with `force`, move it there if it exists.

    Without `force` an existing target is left alone: the call succeeds if it already
    points at the base commit (retries are safe), else 409. With `force` the move is
    checked against the token's ref policy as a push would be (`no-force-push` refuses
    a move that is not a fast-forward).
    """
    call.only(body=("base_ref", "base_branch", "target_branch", "base_is_ephemeral", "target_is_ephemeral", "force"))
    repo = _exists(call)
    base = _str(call.body, "base_ref") or _str(call.body, "base_branch")
    if base is None:
        raise Refused(400, "base_ref is required")
    target = _str(call.body, "target_branch")
    if target is None:
        raise Refused(400, "target_branch is required")
    target = check_branch(target, "target_branch")
    base_eph, target_eph, force = _bool(call.body, "base_is_ephemeral"), _bool(call.body, "target_is_ephemeral"), _bool(call.body, "force")
    target_ref = f"refs/heads/{target}"
    refused = _policy_refuses(call.claims, target_ref, forced=False)
    if refused:
        raise Refused(403, refused, call.claims)
    _, sha = _resolve(call, repo, base, base_eph, "base ref")
    if not call.store.create_branch(repo, target, sha, target_eph):
        existing = call.store.branch_sha(repo, target, target_eph)
        if existing is not None and existing != sha:
            if not force:
                raise Refused(409, f"branch {target!r} already exists at another commit; pass force to move it, or push")
            refused = _policy_refuses(call.claims, target_ref, forced=not call.store.is_ancestor(repo, existing, sha))
            if refused:
                raise Refused(403, refused, call.claims)
            if not call.store.move_branch(repo, target, sha, target_eph, existing):
                raise Refused(409, f"branch {target!r} moved while being updated; retry")
    return Reply(200, {"message": "branch created", "target_branch": target, "target_is_ephemeral": target_eph, "commit_sha": sha})


def delete_branch(call: Call) -> Reply:
    call.only(body=("name", "target_branch", "ephemeral"))
    repo = _exists(call)
    name = _str(call.body, "name") or _str(call.body, "target_branch")
    if name is None:
        raise Refused(400, "name is required")
    if name.startswith("refs/"):
        raise Refused(400, "name must be a branch name, not a full ref")
    name = check_branch(name, "name")
    ephemeral = _bool(call.body, "ephemeral")
    refused = _policy_refuses(call.claims, f"refs/heads/{name}", forced=True)
    if refused:
        raise Refused(403, refused, call.claims)
    sha = call.store.branch_sha(repo, name, ephemeral)
    if sha is None or not call.store.delete_branch(repo, name, ephemeral, sha):
        where = "the ephemeral namespace" if ephemeral else "the default namespace"
        raise Refused(404, f"branch {name!r} not found in {where} of {repo!r}")
    return Reply(200, {"name": name, "message": "branch deleted", "ephemeral": ephemeral})


# ---- history, diffs, files ----------------------------------------------------------------


def list_commits(call: Call) -> Reply:
    call.only(query=("branch", "cursor", "limit", "ephemeral", "path"))
    repo, limit = _exists(call), call.limit()
    _, sha = _resolve(call, repo, call.param("branch"), call.flag("ephemeral"), "branch")
    cursor = call.param("cursor") or "0"
    if not re.fullmatch(r"[0-9]{1,9}", cursor):
        raise Refused(400, "cursor must be a value returned as next_cursor")
    skip = int(cursor)
    path = call.param("path")
    if path is not None:
        path = _file_path(path)
    commits = call.store.log(repo, sha, skip, limit + 1, path)
    has_more = len(commits) > limit
    return Reply(200, {"commits": commits[:limit], "next_cursor": str(skip + limit) if has_more else None, "has_more": has_more})


def branch_diff(call: Call) -> Reply:
    """`branch` against `base` from their merge base, each side in its own namespace."""
    call.only(query=("branch", "base", "ephemeral", "ephemeral_base", "path"))
    repo = _exists(call)
    branch = call.param("branch")
    if not branch:
        raise Refused(400, "branch is required")
    branch, head = _resolve(call, repo, branch, call.flag("ephemeral"), "branch")
    base, base_sha = _resolve(call, repo, call.param("base"), call.flag("ephemeral_base"), "base")
    merge_base = call.store.merge_base(repo, base_sha, head)
    files = call.store.diff(repo, merge_base or base_sha, head, [_file_path(p) for p in call.params("path")])
    additions = sum(f["additions"] for f in files)
    deletions = sum(f["deletions"] for f in files)
    result: Json = {
        "branch": branch,
        "base": base,
        "stats": {"files": len(files), "additions": additions, "deletions": deletions, "changes": additions + deletions},
        "files": files,
        "filtered_files": [],
    }
    if merge_base:
        result["merge_base_sha"] = merge_base
    return Reply(200, result)


def list_files(call: Call) -> Reply:
    call.only(query=("ref", "ephemeral", "path", "recursive", "cursor", "limit"))
    repo = _exists(call)
    name, sha = _resolve(call, repo, call.param("ref"), call.flag("ephemeral"), "ref")
    path = call.param("path")
    recursive = call.flag("recursive") if call.param("recursive") is not None else True
    raw_limit = call.param("limit")
    if raw_limit is not None and not re.fullmatch(r"[0-9]{1,6}", raw_limit):
        raise Refused(400, "limit must be a whole number from 1 to 5000")
    limit = min(int(raw_limit or 1000), 5000) or 1000
    cursor = call.param("cursor") or "0"
    if not re.fullmatch(r"[0-9]{1,9}", cursor):
        raise Refused(400, "cursor must be a value returned as next_cursor")
    rows = call.store.tree(repo, sha, _file_path(path.strip("/")) if path and path.strip("/") else None, recursive)
    page = rows[int(cursor) : int(cursor) + limit]
    has_more = int(cursor) + limit < len(rows)
    result: Json = {
        "paths": [p for p, kind, _ in page if kind in ("blob", "symlink")],
        "entries": [{"path": p, "type": kind, "mode": mode} for p, kind, mode in page],
        "ref": name,
        "has_more": has_more,
    }
    if has_more:
        result["next_cursor"] = str(int(cursor) + limit)
    return Reply(200, result)


def list_tags(call: Call) -> Reply:
    call.only(query=("cursor", "limit"))
    repo, limit, cursor = _exists(call), call.limit(), call.param("cursor") or ""
    rows = [r for r in call.store.tags(repo) if not cursor or r[0] > cursor]
    page, has_more = rows[:limit], len(rows) > limit
    tags = [{"cursor": name, "name": name, "sha": sha} for name, sha in page]
    return Reply(200, {"tags": tags, "next_cursor": page[-1][0] if has_more else None, "has_more": has_more})


def get_commit(call: Call) -> Reply:
    """One commit by sha or any name that resolves in the default namespace."""
    call.only(query=("sha", "ref"))  # the SDK's main line names it `ref`
    repo = _exists(call)
    rev = call.param("sha") or call.param("ref")
    if not rev:
        raise Refused(400, "sha is required")
    _, sha = _resolve(call, repo, rev, False, "commit")
    return Reply(200, {"commit": call.store.commit(repo, sha)})


def commit_diff(call: Call) -> Reply:
    """A commit against `baseSha`, or against its first parent (the empty tree for a root)."""
    call.only(query=("sha", "ref", "baseSha", "gitApplyCompatible", "path"))
    repo = _exists(call)
    rev = call.param("sha") or call.param("ref")
    if not rev:
        raise Refused(400, "sha is required")
    call.flag("gitApplyCompatible")  # validated; the patches served are `git diff` output, which git apply takes
    _, sha = _resolve(call, repo, rev, False, "commit")
    base_rev = call.param("baseSha")
    result: Json = {"sha": sha}
    if base_rev:
        _, base = _resolve(call, repo, base_rev, False, "baseSha")
        merge_base = call.store.merge_base(repo, base, sha)
        result["base_sha"] = base
        if merge_base:
            result["merge_base_sha"] = merge_base
            base = merge_base  # the diff runs from where the two histories meet
    else:
        parents = call.store.log(repo, sha, 0, 1, None, walk=False)[0]["parent_shas"]
        base = parents[0] if parents else EMPTY_TREE
        if parents:
            result["base_sha"] = base
    files = call.store.diff(repo, base, sha, [_file_path(p) for p in call.params("path")])
    additions = sum(f["additions"] for f in files)
    deletions = sum(f["deletions"] for f in files)
    result.update(
        stats={"files": len(files), "additions": additions, "deletions": deletions, "changes": additions + deletions},
        files=files,
        filtered_files=[],
    )
    return Reply(200, result)


EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


def get_file(call: Call) -> Reply:
    """The file's bytes (GET) or only its headers (HEAD), with Code Storage's metadata headers.

    `Range` (one range), `If-None-Match` and `If-Match` are served; the other conditional
    headers the SDK forwards are refused with 400 rather than ignored.
    """
    call.only(query=("path", "ref", "ephemeral", "ephemeral_base"))
    if call.flag("ephemeral_base"):
        raise Refused(400, "ephemeral_base cannot be honoured by the dev server for file reads; pass ephemeral=true with the ref")
    for header in ("If-Modified-Since", "If-Unmodified-Since", "If-Range"):
        if call.headers.get(header):
            raise Refused(400, f"{header} cannot be honoured by the dev server; use If-None-Match with the ETag")
    repo = _exists(call)
    raw_path = call.param("path")
    if not raw_path:
        raise Refused(400, "path is required")
    path = _file_path(raw_path)
    _, sha = _resolve(call, repo, call.param("ref"), call.flag("ephemeral"), "ref")
    found = call.store.read_blob(repo, sha, path)
    if found is None:
        raise Refused(404, f"{path!r} is not a file at that ref")
    blob, data, last = found
    etag = f'"{blob}"'
    headers = {"ETag": etag, "X-Blob-Sha": blob, "X-Last-Commit-Sha": last, "Accept-Ranges": "bytes"}
    if_match = call.headers.get("If-Match")
    if if_match and if_match.strip() not in ("*", etag):
        return Reply(412, data=b"", headers=headers, ctype="application/octet-stream")
    if_none = call.headers.get("If-None-Match")
    if if_none and (if_none.strip() == "*" or etag in [t.strip() for t in if_none.split(",")]):
        return Reply(304, data=b"", headers=headers, ctype="application/octet-stream")
    rng = call.headers.get("Range")
    if rng:
        span = _byte_range(rng, len(data))
        if span is None:
            headers["Content-Range"] = f"bytes */{len(data)}"
            return Reply(416, data=b"", headers=headers, ctype="application/octet-stream")
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Reply(206, data=data[start : end + 1], headers=headers, ctype="application/octet-stream")
    return Reply(200, data=data, headers=headers, ctype="application/octet-stream")


def _byte_range(value: str, size: int) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*bytes=([0-9]{0,15})-([0-9]{0,15})\s*", value)
    if not m or not (m.group(1) or m.group(2)):
        raise Refused(400, "Range must be one byte range (bytes=START-END); several ranges cannot be honoured by the dev server")
    if not m.group(1):
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n and size else None
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (start, end) if start <= end and start < size else None


def _file_path(path: str) -> str:
    parts = path.split("/")
    if len(path) > 4096 or "\0" in path or path.startswith("-") or any(p in ("", ".", "..") for p in parts):
        raise Refused(400, f"path {path[:100]!r} is not a repository-relative file path")
    return path


def _iso(when: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# ---- the route table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One REST endpoint. `name` is what the SDK calls it (and what a 501 says)."""

    name: str
    method: str
    v1: str  # the path under /api/v1/
    path: str | None  # under /api/repos/{id}/ ("" is the repository itself); None: /api/repos
    scope: str | None
    handler: Handler | None = None

    def matches_versionless(self, rest: str) -> bool:
        if self.path is not None and self.path.endswith("/*"):
            return rest.startswith(self.path[:-1]) and len(rest) > len(self.path) - 1
        return rest == self.path


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("create_repo", "POST", "repos", None, "repo:write", create_repo),
    Endpoint("list_repos", "GET", "repos", None, "org:read", list_repos),
    Endpoint("find_one", "GET", "repo", "", "git:read", find_one),
    Endpoint("delete_repo", "DELETE", "repos/delete", "", "repo:write", delete_repo),
    Endpoint("create_git_credential", "POST", "repos/git-credentials", "git-credentials", None),
    Endpoint("update_git_credential", "PUT", "repos/git-credentials", "git-credentials/*", None),
    Endpoint("delete_git_credential", "DELETE", "repos/git-credentials", "git-credentials/*", None),
    Endpoint("get_file_stream", "GET", "repos/file", "file", "git:read", get_file),
    Endpoint("head_file", "HEAD", "repos/file", "file", "git:read", get_file),
    Endpoint("get_archive_stream", "POST", "repos/archive", "archive", None),
    Endpoint("list_files", "GET", "repos/files", "files", "git:read", list_files),
    Endpoint("list_files_with_metadata", "GET", "repos/files/metadata", "files/metadata", None),
    Endpoint("list_branches", "GET", "repos/branches", "branches", "git:read", list_branches),
    Endpoint("delete_branch", "DELETE", "repos/branches", "branches", "git:write", delete_branch),
    Endpoint("create_branch/promote_ephemeral_branch", "POST", "repos/branches/create", "branches/create", "git:write", create_branch),
    Endpoint("get_branch_diff", "GET", "repos/branches/diff", "branches/diff", "git:read", branch_diff),
    Endpoint("merge", "POST", "repos/merge", "merge", None),
    Endpoint("preview_merge", "GET", "repos/merge/preview", "merge/preview", None),
    Endpoint("list_tags", "GET", "repos/tags", "tags", "git:read", list_tags),
    Endpoint("create_tag", "POST", "repos/tags", "tags", None),
    Endpoint("delete_tag", "DELETE", "repos/tags", "tags/*", None),
    Endpoint("list_commits", "GET", "repos/commits", "commits", "git:read", list_commits),
    Endpoint("get_commit", "GET", "repos/commit", "commit", "git:read", get_commit),
    Endpoint("get_blame", "GET", "repos/blame", "blame", None),
    Endpoint("get_note", "GET", "repos/notes", "notes", None),
    Endpoint("create_note/append_note", "POST", "repos/notes", "notes", None),
    Endpoint("delete_note", "DELETE", "repos/notes", "notes", None),
    Endpoint("list_notes_refs", "GET", "repos/notes/refs", "notes/refs", None),
    Endpoint("get_commit_diff", "GET", "repos/diff", "diff", "git:read", commit_diff),
    Endpoint("grep", "POST", "repos/grep", "grep", None),
    Endpoint("pull_upstream", "POST", "repos/pull-upstream", "pull-upstream", None),
    Endpoint("restore_commit", "POST", "repos/restore-commit", "restore-commit", None),
    Endpoint("create_commit", "POST", "repos/commit-pack", "commit-pack", None),
    Endpoint("create_commit_from_diff", "POST", "repos/diff-commit", "diff-commit", None),
)

# Anchored; the id segment is one path component of unreserved characters and %XX escapes
# (the SDK encodes `/` as %2F), decoded exactly once below.
_VERSIONLESS = re.compile(r"^/api/repos(?:/(?P<id>[A-Za-z0-9._~%-]{1,600})(?:/(?P<rest>[A-Za-z0-9._~%/-]{1,600}))?)?$")
_V1 = re.compile(r"^/api/v1/(?P<rest>[a-z/-]{1,100})$")


def route(method: str, path: str) -> tuple[Endpoint, str | None]:
    """The endpoint for `method path`, and the repository id the path names (versionless).

    Refused(404) for a path Code Storage does not have, Refused(405) for a known path
    with another method, Refused(400) for an id that is not one.
    """
    m = _V1.match(path)
    if m:
        candidates = [e for e in ENDPOINTS if e.v1 == m.group("rest")]
        path_repo = None
    else:
        m = _VERSIONLESS.match(path)
        if not m:
            raise Refused(404, f"no such endpoint: {method} {path[:100]}")
        raw_id, rest = m.group("id"), m.group("rest")
        if raw_id is None:
            candidates = [e for e in ENDPOINTS if e.path is None]
            path_repo = None
        else:
            candidates = [e for e in ENDPOINTS if e.path is not None and e.matches_versionless(rest or "")]
            path_repo = _decode_id(raw_id)
    if not candidates:
        raise Refused(404, f"no such endpoint: {method} {path[:100]}")
    for e in candidates:
        if e.method == method:
            return e, path_repo
    allowed = ", ".join(sorted({e.method for e in candidates}))
    raise Refused(405, f"{method} is not allowed on {path[:100]} (allowed: {allowed})")


def _decode_id(raw: str) -> str:
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        raise Refused(400, "malformed percent-encoding in the repository id")
    try:
        repo = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise Refused(400, "the repository id is not UTF-8 once decoded") from None
    try:
        return validate_repo_id(repo)
    except ConfigError:
        raise Refused(400, f"{repo[:200]!r} is not a repository id") from None
