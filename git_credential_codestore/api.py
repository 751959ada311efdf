"""A small client for Code Storage's REST API (and the dev server's copy of it).

Tokens travel only in the `Authorization: Bearer` header; error messages carry the
server's one-line reason and never the token.
"""

from __future__ import annotations

import email.message
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import IO

from . import jsontext
from .errors import RemoteError, redact
from .secrets import Token

TIMEOUT = 30


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects and copies Authorization to the new host; we never do."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: email.message.Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None  # the 3xx then surfaces as an HTTPError, reported below


_OPENER = urllib.request.build_opener(_NoRedirects)


def call(
    api_url: str, method: str, path: str, token: Token, body: Mapping[str, object] | None = None
) -> tuple[int, dict[str, object]]:
    """One request; returns (status, JSON body). Network failures raise RemoteError."""
    req = urllib.request.Request(
        api_url.rstrip("/") + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": f"Bearer {token.reveal()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Code-Storage-Agent": "codestore",
        },
    )
    try:
        with _OPENER.open(req, timeout=TIMEOUT) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RemoteError(
            f"cannot reach {api_url} ({redact(str(reason))}); check CODESTORE_API_URL and the network"
        ) from None
    try:
        data = jsontext.loads(raw or b"{}")
    except ValueError:
        data = {"error": raw[:200].decode("utf-8", "replace").strip()}
    return status, data if isinstance(data, dict) else {"value": data}


def reason(status: int, data: Mapping[str, object]) -> str:
    if 300 <= status < 400:
        return f"HTTP {status}: the server redirected, and a token is never sent on to another address; check CODESTORE_API_URL"
    text = str(data.get("error") or data.get("message") or "").strip()
    return redact(" ".join(text.split())) or f"HTTP {status}"


def hint(status: int) -> str:
    if status == 401:
        return " (token rejected: is the public key registered with this kid, and is the clock right?)"
    if status == 403:
        return " (the token lacks the scope, or a ref policy forbids it)"
    return ""


def create_repo(api_url: str, token: Token, default_branch: str) -> dict[str, object]:
    status, data = call(api_url, "POST", "/api/v1/repos", token, {"default_branch": default_branch})
    if status == 409:
        raise RemoteError("that repository already exists")
    if not 200 <= status < 300:
        raise RemoteError(f"creating the repository failed: {reason(status, data)}{hint(status)}")
    return data


PAGE_LIMIT = 100  # Code Storage's maximum page size (its default is 20)
MAX_PAGES = 10000  # a server that never stops paging is a bug, not an org


RENEW_BEFORE = 15  # seconds before its expiry a listing's token is replaced by a fresh one (_pages)


def _pages(api_url: str, path: str, token: Token | Callable[[], Token], what: str, key: str,
           params: Mapping[str, str] | None = None) -> Iterator[dict[str, object]]:
    """Every item of a paged list: `cursor`/`limit` in, `{<key>, next_cursor, has_more}` out.

    Follows `next_cursor` while `has_more` says so (or, from a server that omits
    `has_more`, while there is a cursor); a cursor seen twice is an error, never a loop.
    `token` may be a function minting one: a token that would expire before the next page
    is replaced (a short-lived one outlived a listing of many pages, which then failed).
    """
    import time
    from urllib.parse import urlencode

    mint = token if callable(token) else None
    current = mint() if mint is not None else token
    assert isinstance(current, Token)
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        if mint is not None and current.expires_at - time.time() < RENEW_BEFORE:
            current = mint()
        query = {**(params or {}), "limit": str(PAGE_LIMIT)}
        if cursor:
            query["cursor"] = cursor
        status, data = call(api_url, "GET", f"{path}?{urlencode(query)}", current)
        if not 200 <= status < 300:
            raise RemoteError(f"listing {what} failed: {reason(status, data)}{hint(status)}")
        items = data.get(key)
        if not isinstance(items, list):
            raise RemoteError(f"listing {what}: the server's answer has no {key!r} list")
        yield from (i for i in items if isinstance(i, dict))
        nxt = data.get("next_cursor")
        more = data.get("has_more")
        if not (more if isinstance(more, bool) else bool(nxt)):
            return
        if not isinstance(nxt, str) or not nxt or nxt in seen:
            raise RemoteError(f"listing {what}: the server said there is more but gave no new cursor; try again later")
        seen.add(nxt)
        cursor = nxt
    raise RemoteError(f"listing {what}: more than {MAX_PAGES} pages; stopping")


def list_repos(api_url: str, token: Token | Callable[[], Token]) -> list[dict[str, object]]:
    """Every repository of the org (GET /api/v1/repos, all pages; an org:read token)."""
    return list(_pages(api_url, "/api/v1/repos", token, "repositories", "repos"))


def get_repo(api_url: str, token: Token) -> dict[str, object] | None:
    """The token's repository (GET /api/v1/repo, git:read), or None when there is none."""
    status, data = call(api_url, "GET", "/api/v1/repo", token)
    if status == 404:
        return None
    if not 200 <= status < 300:
        raise RemoteError(f"reading the repository failed: {reason(status, data)}{hint(status)}")
    return data


def delete_repo(api_url: str, token: Token, repo: str) -> dict[str, object]:
    """DELETE /api/v1/repos/delete: the repository named by the token (repo:write)."""
    status, data = call(api_url, "DELETE", "/api/v1/repos/delete", token)
    if status == 404:
        raise RemoteError(f"there is no repository {repo!r} to delete; see: codestore repo list")
    if status == 409:
        raise RemoteError(f"repository {repo!r} is already deleted")
    if not 200 <= status < 300:
        raise RemoteError(f"deleting {repo} failed: {reason(status, data)}{hint(status)}")
    return data


def list_branches(api_url: str, token: Token | Callable[[], Token], ephemeral: bool) -> list[dict[str, object]]:
    """Every branch in one namespace (GET /api/v1/repos/branches, all pages; git:read)."""
    where = "the +ephemeral namespace" if ephemeral else "the default namespace"
    return list(_pages(api_url, "/api/v1/repos/branches", token, f"branches in {where}", "branches",
                       {"ephemeral": "true" if ephemeral else "false"}))


def delete_branch(api_url: str, token: Token, repo: str, name: str, ephemeral: bool) -> dict[str, object]:
    """DELETE /api/v1/repos/branches {name, ephemeral} (git:write)."""
    status, data = call(api_url, "DELETE", "/api/v1/repos/branches", token, {"name": name, "ephemeral": ephemeral})
    where = f"{repo}+ephemeral" if ephemeral else repo
    if status == 404:
        raise RemoteError(f"there is no branch {name!r} in {where}; see: codestore branch list {repo}")
    if not 200 <= status < 300:
        raise RemoteError(f"deleting branch {name} of {where} failed: {reason(status, data)}{hint(status)}")
    return data
