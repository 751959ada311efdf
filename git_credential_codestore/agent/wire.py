"""The token request's wire format: git's own `key=value` lines, no JSON.

Helpers mint a token on every git fetch and push, and importing `json` (with `re` and
`enum` behind it) costs a CPython helper more than the whole round trip to the agent.
So `POST /v1/token` also accepts, and then answers in, this format:

    repo=team/app              one repository id
    scopes=git:read git:write  space-separated
    ephemeral=1                0 or 1
    narrow=1                   0 or 1 (scopes are a ceiling)
    ttl=300                    optional
    purpose=credential         for the audit log
    ref=no-push:refs/heads/main    repeatable, in order; ':' never occurs in a ref name
    owner.org=acme             the owner's configuration (owner.kid, owner.key, owner.sub)

The reply is the same format (`token`, `expires_at`, `ttl`, `scopes`, `sub`, or `error`
and `code`). Decoding is strict: an unknown or repeated key, a line without `=`, or a
control character is an error, never skipped. The decoded request is the same object
the JSON form gives, and `policy.parse_request` validates both alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ProtocolError

CONTENT_TYPE = "text/x-codestore-lines"
MAX_LINES = 64
_FLAGS = ("ephemeral", "narrow")
_SINGLE = ("repo", "scopes", "ttl", "purpose", *_FLAGS)
_OWNER = ("org", "kid", "key", "sub")


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
        if "\n" in text or "\r" in text or "\0" in text:
            raise ProtocolError(f"the value of {key} has a line break")
        out.append(f"{key}={text}\n")
    return "".join(out).encode("utf-8")


def decode(body: bytes) -> dict[str, str]:
    """Lines to a flat dict of strings (repeated `ref` lines joined by newlines)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("the body is not UTF-8") from None
    fields: dict[str, str] = {}
    lines = [ln for ln in text.split("\n") if ln]
    if len(lines) > MAX_LINES:
        raise ProtocolError(f"more than {MAX_LINES} lines")
    for n, line in enumerate(lines, 1):
        key, sep, value = line.partition("=")
        if not sep or not key or any(ord(c) < 32 or c == "\x7f" for c in line):
            raise ProtocolError(f"line {n} is not key=value")
        if key == "ref":
            fields["ref"] = fields["ref"] + "\n" + value if "ref" in fields else value
        elif key in fields:
            raise ProtocolError(f"{key} appears twice")
        else:
            fields[key] = value
    return fields


def request_from_lines(body: bytes) -> dict[str, object]:
    """A token request in lines, as the dict its JSON form would be."""
    fields = decode(body)
    data: dict[str, object] = {}
    owner: dict[str, str] = {}
    for key, value in fields.items():
        if key in _FLAGS:
            if value not in ("0", "1"):
                raise ProtocolError(f"{key} must be 0 or 1")
            data[key] = value == "1"
        elif key == "scopes":
            data["scopes"] = value.split()
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
                rules.append([pattern, [op for op in ops.split(",") if op]])
            data["refs"] = rules
        elif key in _SINGLE:
            data[key] = value
        elif key.startswith("owner.") and key[6:] in _OWNER:
            owner[key[6:]] = value
        else:
            raise ProtocolError(f"unknown field {key[:40]!r}")
    if owner:
        data["owner"] = owner
    return data


def request_to_lines(
    repo: str,
    scopes: tuple[str, ...] | list[str],
    ephemeral: bool,
    ttl: int | None,
    refs: object,
    purpose: str,
    narrow: bool,
    owner: Mapping[str, str | None] | None,
) -> bytes:
    fields: dict[str, object] = {
        "repo": repo, "scopes": list(scopes), "ephemeral": ephemeral, "narrow": narrow,
        "ttl": ttl, "purpose": purpose,
    }
    body = encode(fields)
    for pattern, ops in refs:  # type: ignore[attr-defined]
        if ":" in pattern:
            raise ProtocolError("a ref pattern cannot contain ':'")
        body += encode({"ref": f"{','.join(ops)}:{pattern}"})
    if owner:
        body += encode({f"owner.{k}": v for k, v in owner.items()})
    return body


def reply_to_lines(reply: Mapping[str, object]) -> bytes:
    return encode({k: v for k, v in reply.items() if isinstance(v, (str, int, bool, list, tuple))})
