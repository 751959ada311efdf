"""`POST /v1/token`'s one wire format: git's own `key=value` lines, no JSON.

Helpers mint a token on every git fetch and push, and importing `json` (with `re` and
`enum` behind it) costs a CPython helper more than the whole round trip to the agent.
So a token request, and its reply, are lines (the admin endpoints speak JSON):

    repo=team/app              one repository id (or "org")
    scopes=git:read git:write  space-separated
    ephemeral=1                0 or 1
    narrow=1                   0 or 1 (scopes are a ceiling)
    ttl=300                    optional
    purpose=credential         for the audit log
    ref=no-push:refs/heads/main    repeatable, in order; ':' never occurs in a ref pattern
    owner.org=acme             the owner's configuration (owner.kid, owner.key, owner.sub)

The reply is the same format (`token`, `expires_at`, `ttl`, `scopes`, `sub`, or `error`
and `code`). Decoding is strict: an unknown or repeated key, a line without `=`, or a
control character is an error, never skipped. A decoded request is a
`vocab.TokenRequest`, the same type every token source serves; the agent's policy then
checks its values (`TokenRequest.checked`).
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..lines import has_control, parse_lines
from ..vocab import TokenRequest

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping

CONTENT_TYPE = "text/x-codestore-lines"
MAX_LINES = 64
_FLAGS = ("ephemeral", "narrow")
_OWNER = ("org", "kid", "key", "sub")
# The field names this format has, in requests and replies: only these are ever named in
# an error, since a malformed body may hold a secret where a field name goes.
_NAMES = frozenset(("repo", "scopes", "ttl", "purpose", "ref", *_FLAGS, *(f"owner.{k}" for k in _OWNER),
                    "token", "expires_at", "sub", "error", "code", "warning"))


def encode(fields: Mapping[str, object]) -> bytes:
    """Flat fields to lines: lists joined by spaces, booleans as 0/1, None left out."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        text = str(value)
        if has_control(key + text):  # what decode() would refuse is never sent
            raise ProtocolError(f"the value of {key} has a line break or another control character")
        out.append(f"{key}={text}\n")
    return "".join(out).encode("utf-8")


def decode(body: bytes) -> dict[str, str]:
    """Lines to a flat dict of strings (repeated `ref` lines joined by newlines)."""
    fields: dict[str, str] = {}
    for n, (key, value) in enumerate(parse_lines(body, what="the body", max_lines=MAX_LINES, controls=False), 1):
        if key == "ref":
            fields["ref"] = fields["ref"] + "\n" + value if "ref" in fields else value
        elif key in fields:
            raise ProtocolError(f"{key if key in _NAMES else f'the field on line {n}'} appears twice")
        else:
            fields[key] = value
    return fields


def encode_request(request: TokenRequest, owner: Mapping[str, str | None] | None = None) -> bytes:
    """A token request as lines (the owner's configuration too, when there is no grant)."""
    body = encode({
        "repo": request.repo, "scopes": list(request.scopes), "ephemeral": bool(request.ephemeral),
        "narrow": bool(request.narrow), "ttl": request.ttl, "purpose": request.purpose,
    })
    for pattern, ops in request.refs:
        if ":" in pattern:
            raise ProtocolError("a ref pattern cannot contain ':'")
        body += encode({"ref": f"{','.join(ops)}:{pattern}"})
    if owner:
        body += encode({f"owner.{k}": v for k, v in owner.items()})
    return body


def decode_request(body: bytes) -> tuple[TokenRequest, dict[str, str]]:
    """Lines to (request, owner fields); ProtocolError on anything that is not this format."""
    fields = decode(body)
    data: dict[str, object] = {}
    owner: dict[str, str] = {}
    for key, value in fields.items():
        if key in _FLAGS:
            if value not in ("0", "1"):
                raise ProtocolError(f"{key} must be 0 or 1")
            data[key] = value == "1"
        elif key == "scopes":
            # ASCII spaces only, as encode() joins them: str.split() also splits on
            # \x85 and other Unicode spaces, which would turn one odd scope into none.
            data["scopes"] = tuple(scope for scope in value.split(" ") if scope)
        elif key == "ttl":
            if not value.isascii() or not value.isdigit() or len(value) > 9:
                raise ProtocolError("ttl must be a whole number of seconds")
            data["ttl"] = int(value)
        elif key == "ref":
            rules = []
            for rule in value.split("\n"):
                ops, sep, pattern = rule.partition(":")
                if not sep:
                    raise ProtocolError("ref must be OPS:PATTERN, e.g. no-push:refs/heads/main")
                rules.append((pattern, [op for op in ops.split(",") if op]))
            data["refs"] = rules
        elif key in ("repo", "purpose"):
            data[key] = value
        elif key.startswith("owner.") and key[6:] in _OWNER:
            owner[key[6:]] = value
        else:
            # The field's own text is not echoed: a malformed body may hold a secret there.
            raise ProtocolError("unknown field (fields: repo, scopes, ephemeral, narrow, ttl, purpose, ref, owner.*)")
    if "repo" not in data:
        raise ProtocolError("a token request needs repo=")
    if "scopes" not in data:
        raise ProtocolError("a token request needs scopes=")
    return TokenRequest(**data), owner


def encode_reply(reply: Mapping[str, object]) -> bytes:
    if isinstance(reply, Lines):
        return reply.encoded
    return encode({k: v for k, v in reply.items() if isinstance(v, (str, int, bool, list, tuple))})


class Lines(dict[str, object]):
    """A reply that comes with its encoding made (`encoded`): `encode_reply` sends that."""

    __slots__ = ("encoded",)
    encoded: bytes


def token_reply(token: str, expires_at: int, ttl: int, scopes: list[str], sub: str, rest: bytes) -> Lines:
    """A token's reply; `rest` is `encode` of its ttl, scopes and sub, made once for the many
    tokens that share them. The token (base64url and dots) and its expiry (a number) cannot
    hold a control character, so they are written as they are."""
    reply = Lines(token=token, expires_at=expires_at, ttl=ttl, scopes=scopes, sub=sub)
    reply.encoded = b"token=%s\nexpires_at=%d\n%s" % (token.encode("ascii"), expires_at, rest)
    return reply
