"""Clamping: what a request may get, decided before anything is signed.

Two callers exist. The owner (same uid, on the agent's own socket, no grant) could read
the key anyway, so the agent signs what the local key would sign: any known scopes, a
TTL within config bounds. A grant holder gets nothing beyond its grant: the request is
checked field by field and refused with a reason, never silently widened; the token
carries the grant's ref rules first (first match wins, so a request cannot override
them) and the grant's `sub`.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import KNOWN_SCOPES, MAX_TTL, MIN_TTL, validate_repo_id
from ..errors import CodestoreError, Refused
from .grants import Grant


@dataclass(frozen=True)
class Request:
    repo: str
    scopes: tuple[str, ...]
    ephemeral: bool
    ttl: int | None
    refs: tuple[tuple[str, tuple[str, ...]], ...]
    purpose: str
    narrow: bool = False  # scopes are a ceiling: grant holders get the intersection


@dataclass(frozen=True)
class Decision:
    repo: str
    scopes: tuple[str, ...]
    ttl: int
    refs: list[tuple[str, list[str]]]
    sub: str


def parse_request(obj: object) -> Request:
    """Validate the JSON body of a token request; every error is a 400 with a reason."""
    if not isinstance(obj, Mapping):
        raise Refused(400, "request body must be a JSON object")
    repo = obj.get("repo")
    if not isinstance(repo, str):
        raise Refused(400, "request needs \"repo\": a repository id")
    if repo != "org":  # org:read tokens are org-wide and name no repository
        try:
            validate_repo_id(repo)
        except CodestoreError as e:
            raise Refused(400, str(e)) from None
    scopes = obj.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise Refused(400, "request needs \"scopes\": a non-empty list of strings")
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise Refused(400, f"unknown scope {unknown[0][:40]!r}; known: {' '.join(KNOWN_SCOPES)}")
    ephemeral = obj.get("ephemeral", False)
    if not isinstance(ephemeral, bool):
        raise Refused(400, "\"ephemeral\" must be true or false")
    ttl = obj.get("ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise Refused(400, "\"ttl\" must be a whole number of seconds")
    if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
        raise Refused(400, f"TTL {ttl}s is outside {MIN_TTL}..{MAX_TTL}s")
    refs_raw = obj.get("refs") or []
    if not isinstance(refs_raw, list):
        raise Refused(400, "\"refs\" must be a list of [pattern, [ops]]")
    from ..tokens import validate_refs  # noqa: PLC0415 - the agent has it loaded already

    try:
        refs = validate_refs(refs_raw)
    except CodestoreError as e:
        raise Refused(400, str(e)) from None
    narrow = obj.get("narrow", False)
    if not isinstance(narrow, bool):
        raise Refused(400, "\"narrow\" must be true or false")
    purpose = obj.get("purpose", "cli")
    if not isinstance(purpose, str):
        purpose = "?"
    return Request(
        repo=repo,
        scopes=tuple(dict.fromkeys(scopes)),
        ephemeral=ephemeral,
        ttl=ttl,
        refs=tuple((p, tuple(ops)) for p, ops in refs),
        purpose=purpose[:20],
        narrow=narrow,
    )


def allowed_scopes(granted: tuple[str, ...] | list[str]) -> set[str]:
    out = set(granted)
    if "git:write" in out:
        out.add("git:read")  # Code Storage: write includes read
    return out


def clamp_to_grant(grant: Grant, req: Request, default_ttl: int, now: float | None = None) -> Decision:
    """The token a grant holder gets for `req`, or Refused naming the first excess."""
    now = time.time() if now is None else now
    state = grant.state(now)
    if state != "active":
        raise Refused(401, f"grant {grant.id} is {state}; ask its owner for a new one")
    if not any(fnmatch.fnmatchcase(req.repo, pattern) for pattern in grant.repos):
        raise Refused(403, f"grant {grant.id} does not cover repository {req.repo!r} (it covers {', '.join(grant.repos)})")
    scopes = req.scopes
    if req.narrow:
        # A ceiling, not a demand: keep what the grant allows. Still refused below.
        scopes = tuple(s for s in req.scopes if s in allowed_scopes(grant.scopes)) or req.scopes
    extra = [s for s in scopes if s not in allowed_scopes(grant.scopes)]
    if extra:
        raise Refused(403, f"grant {grant.id} does not allow {' '.join(extra)} (it allows {' '.join(grant.scopes)})")
    if grant.ephemeral_only and not req.ephemeral:
        raise Refused(
            403, f"grant {grant.id} is ephemeral-only; use the {req.repo}+ephemeral.git namespace"
        )
    if req.ttl is not None and req.ttl > grant.max_ttl:
        raise Refused(403, f"TTL {req.ttl}s exceeds grant {grant.id}'s maximum of {grant.max_ttl}s")
    ttl = req.ttl if req.ttl is not None else min(default_ttl, grant.max_ttl)
    if grant.expires_at is not None:
        left = int(grant.expires_at - now)
        if left < MIN_TTL:
            raise Refused(401, f"grant {grant.id} expires in {left}s, too soon for a token; ask for a new grant")
        ttl = min(ttl, left)  # a token never outlives its grant
    ttl = max(MIN_TTL, min(ttl, MAX_TTL))
    refs = [(str(p), [str(o) for o in ops]) for p, ops in grant.refs]  # type: ignore[misc]
    refs += [(p, list(ops)) for p, ops in req.refs]
    return Decision(repo=req.repo, scopes=scopes, ttl=ttl, refs=refs, sub=grant.sub)


def clamp_for_owner(req: Request, default_ttl: int, sub: str) -> Decision:
    """The owner signs what the local key would: the request as asked, TTL defaulted."""
    ttl = req.ttl if req.ttl is not None else default_ttl
    return Decision(
        repo=req.repo,
        scopes=req.scopes,
        ttl=ttl,
        refs=[(p, list(ops)) for p, ops in req.refs],
        sub=sub,
    )
