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
from dataclasses import dataclass

from ..errors import Refused
from ..vocab import MAX_TTL, MIN_TTL, TokenRequest, ref_policy, with_implied
from .grants import Grant


@dataclass(frozen=True)
class Decision:
    repo: str
    scopes: tuple[str, ...]
    ttl: int
    refs: list[tuple[str, list[str]]]
    sub: str


def check_request(req: TokenRequest) -> TokenRequest:
    """Validate a decoded token request (vocab's one check); every error is a 400 with a reason."""
    return req.checked(lambda reason: Refused(400, reason))


def clamp_to_grant(grant: Grant, req: TokenRequest, default_ttl: int, now: float | None = None) -> Decision:
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
        scopes = tuple(s for s in req.scopes if s in with_implied(grant.scopes)) or req.scopes
    extra = [s for s in scopes if s not in with_implied(grant.scopes)]
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
    refs = ref_policy(grant.refs)  # checked when the grant was made; typed here
    refs += [(p, list(ops)) for p, ops in req.refs]
    return Decision(repo=req.repo, scopes=scopes, ttl=ttl, refs=refs, sub=grant.sub)


def clamp_for_owner(req: TokenRequest, default_ttl: int, sub: str) -> Decision:
    """The owner signs what the local key would: the request as asked, TTL defaulted."""
    ttl = req.ttl if req.ttl is not None else default_ttl
    return Decision(
        repo=req.repo,
        scopes=req.scopes,
        ttl=ttl,
        refs=[(p, list(ops)) for p, ops in req.refs],
        sub=sub,
    )
