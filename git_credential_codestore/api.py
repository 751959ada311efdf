"""A small client for Code Storage's REST API (and the dev server's copy of it).

Tokens travel only in the `Authorization: Bearer` header; error messages carry the
server's one-line reason and never the token.
"""

from __future__ import annotations

import email.message
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import IO

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
        data = json.loads(raw or b"{}")
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


def list_repos(api_url: str, token: Token) -> list[dict[str, object]]:
    status, data = call(api_url, "GET", "/api/v1/repos", token)
    if not 200 <= status < 300:
        raise RemoteError(f"listing repositories failed: {reason(status, data)}{hint(status)}")
    repos = data.get("repos", [])
    return [r for r in repos if isinstance(r, dict)] if isinstance(repos, list) else []
