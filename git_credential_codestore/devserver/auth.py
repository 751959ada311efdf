"""Code Storage's access rules, on top of `tokens.verify`.

`tokens.verify` checks what any holder of the public keys can check (signature by `kid`
or the only key, the algorithm allow-list, `iss`, `exp`/`iat`). This module adds what
depends on the request: where the token comes from (HTTP Basic with the JWT as password
for git, `Bearer` for REST and also accepted for git), that its `repo` claim names the
requested repository, and that it carries the scope the operation needs.

A refusal is an `errors.Refused` carrying the HTTP status and a one-line reason meant
for the client and the request log; reasons are built from names and ids, never the token.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from ..errors import Refused, TokenError
from ..tokens import Claims, PublicKey, verify

MAX_TOKEN_BYTES = 16 * 1024
REALM = "Code Storage"


def token_from_header(value: str | None) -> str:
    """The JWT in an `Authorization` header; Refused(401) when absent or malformed."""
    if not value:
        raise Refused(401, "authentication required: send a Code Storage token")
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if len(rest) > MAX_TOKEN_BYTES * 2:
        raise Refused(401, "credentials too large")
    if scheme.lower() == "bearer":
        token = rest
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise Refused(401, "malformed Basic credentials") from None
        _user, sep, token = decoded.partition(":")
        if not sep:
            raise Refused(401, "malformed Basic credentials: want username t and the token as password")
    else:
        raise Refused(401, f"unsupported authorization scheme {scheme[:20]!r}; use Basic or Bearer")
    if not token:
        raise Refused(401, "empty token: the password must be a Code Storage JWT")
    if len(token) > MAX_TOKEN_BYTES:
        raise Refused(401, "token too large")
    return token


def authenticate(header: str | None, keys: Mapping[str, PublicKey], org: str) -> Claims:
    """Verify the presented token; 401 with the reason when it is not good."""
    token = token_from_header(header)
    try:
        return verify(token, keys, org=org)
    except TokenError as e:
        raise Refused(401, str(e)) from None


def require_repo(claims: Claims, repo: str) -> None:
    # 401, not 403: the token is simply not a credential for this repository, and git
    # then erases it and fails instead of retrying with the same token.
    if claims.repo != repo:
        if not claims.repo:
            raise Refused(401, f"wrong repo: the token names no repository (org-wide tokens only list repositories), not {repo!r}", claims)
        raise Refused(401, f"wrong repo: token is for repository {claims.repo[:200]!r}, not {repo!r}", claims)


def require_scope(claims: Claims, scope: str) -> None:
    if not claims.has(scope):
        have = " ".join(claims.scopes) or "none"
        raise Refused(403, f"missing scope {scope}: token has {have}", claims)


SERVICE_SCOPES = {"git-upload-pack": "git:read", "git-receive-pack": "git:write"}


def authorize_git(claims: Claims, repo: str, service: str) -> None:
    """The repo claim names `repo` (also for +ephemeral) and the scope fits the service."""
    require_repo(claims, repo)
    require_scope(claims, SERVICE_SCOPES[service])
