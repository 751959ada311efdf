"""Clamping: what a request may get, decided before anything is signed.

Two callers exist. The owner (same uid, on the agent's own socket, no grant) could read
the key anyway, so the agent signs what the local key would sign: any known scopes, a
TTL within config bounds; a helper asking `narrow` gets what the agent's configuration
allows, as the helper would have applied itself. A grant holder gets nothing beyond its
grant: the request is checked field by field and refused with a reason, never silently
widened; the token carries the grant's ref rules first (first match wins, so a request
cannot override them) and the grant's `sub`.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard, cast

from ..errors import ConfigError, PolicyError, Refused
from ..lines import has_control, has_surrogate
from ..vocab import MAX_TTL, MIN_TTL, TokenRequest, check_ttl, parse_scopes, ref_policy, with_implied

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from ..config import Config

    class Permission(Protocol):
        """What a token may carry: a grant, or a trust policy applied to one workload."""

        @property
        def label(self) -> str: ...  # "grant 3fa2..." / "trust policy 9c1e...": names it in refusals
        @property
        def repos(self) -> Sequence[str]: ...
        @property
        def scopes(self) -> Sequence[str]: ...
        @property
        def max_ttl(self) -> int: ...
        @property
        def sub(self) -> str: ...
        @property
        def expires_at(self) -> int | None: ...
        @property
        def ephemeral_only(self) -> bool: ...
        @property
        def refs(self) -> Sequence[Sequence[object]]: ...
        def state(self, now: float | None = None) -> str: ...


def is_sub(value: object) -> TypeGuard[str]:
    """Whether a caller-named `sub` (a grant's, an owner's) may be used: short text without a
    control character (NUL: PostgreSQL will not store it; a line break) or a lone surrogate
    (no database driver can encode one). Unicode spaces are allowed, as on the wire."""
    return isinstance(value, str) and 0 < len(value) <= 200 and not has_control(value) and not has_surrogate(value)


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


def covers(patterns: Iterable[str], repo: str) -> bool:
    """Whether a grant's (or trust policy's) repository patterns cover `repo`."""
    return any(fnmatch.fnmatchcase(repo, pattern) for pattern in patterns)


def clamp_to_grant(grant: Permission, req: TokenRequest, default_ttl: int, now: float | None = None) -> Decision:
    """The token a grant holder gets for `req`, or Refused naming the first excess."""
    now = time.time() if now is None else now
    state = grant.state(now)
    if state != "active":
        raise Refused(401, f"{grant.label} is {state}; ask its owner for a new one")
    if not covers(grant.repos, req.repo):
        raise Refused(403, f"{grant.label} does not cover repository {req.repo!r} (it covers {', '.join(grant.repos)})")
    scopes = req.scopes
    allowed = with_implied(grant.scopes)
    if req.narrow:
        # A ceiling, not a demand: keep what the grant allows (with what it implies, as
        # config.Config.narrow does for the owner). Nothing left: refused below.
        kept = [s for s in req.scopes if s in allowed]
        scopes = with_implied(kept) if kept else req.scopes
    extra = [s for s in scopes if s not in allowed]
    if extra:
        raise Refused(403, f"{grant.label} does not allow {' '.join(extra)} (it allows {' '.join(grant.scopes)})")
    if grant.ephemeral_only and not req.ephemeral:
        raise Refused(
            403, f"{grant.label} is ephemeral-only; use the {req.repo}+ephemeral.git namespace"
        )
    if req.ttl is not None and req.ttl > grant.max_ttl:
        raise Refused(403, f"TTL {req.ttl}s exceeds {grant.label}'s maximum of {grant.max_ttl}s")
    ttl = req.ttl if req.ttl is not None else min(default_ttl, grant.max_ttl)
    if grant.expires_at is not None:
        left = int(grant.expires_at - now)
        if left < MIN_TTL:
            raise Refused(401, f"{grant.label} expires in {left}s, too soon for a token; ask for a new grant")
        ttl = min(ttl, left)  # a token never outlives its grant
    ttl = max(MIN_TTL, min(ttl, MAX_TTL))
    refs = [(str(r[0]), [str(o) for o in cast("Iterable[object]", r[1])]) for r in grant.refs]
    refs += [(p, list(ops)) for p, ops in req.refs]
    return Decision(repo=req.repo, scopes=scopes, ttl=ttl, refs=refs, sub=grant.sub)


@dataclass(frozen=True)
class Terms:
    """What a grant or a trust policy may hand out: validated once, for both."""

    repos: list[str]
    scopes: tuple[str, ...]
    max_ttl: int
    ephemeral_only: bool
    refs: list[list[object]]


TERMS = frozenset({"repos", "scopes", "max_ttl", "ephemeral_only", "refs"})  # parse_terms's fields


def only_known(data: Mapping[str, object], known: frozenset[str], what: str) -> None:
    """ConfigError for a field an admin request's `what` does not take. Ignored, a misspelt
    limit (`max_ttl_seconds`) made a grant with the default in its place, and said nothing."""
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{what} has no field {unknown[0][:40]!r}; it takes {', '.join(sorted(known))}")


def parse_terms(data: Mapping[str, object]) -> Terms:
    """`repos`, `scopes`, `max_ttl`, `ephemeral_only`, `refs` of an admin request; ConfigError names the option."""
    repos = data.get("repos")
    if not isinstance(repos, list) or not repos or not all(isinstance(r, str) and r.strip() for r in repos):
        raise ConfigError("a grant needs --repo (a repository id or glob such as team/*)")
    if any(len(r) > 512 for r in repos):
        raise ConfigError("--repo takes a repository id or glob of at most 512 characters")
    if any(not r.isprintable() for r in repos):  # no repository id has them; a terminal would act on them
        raise ConfigError("--repo must be a repository id or glob without control characters or spaces other than ' '")
    for r in repos:  # each of these could never mint: refused here, not at every token request after
        if any(part in ("", ".", "..") for part in r.split("/")):  # no repository id has such a part
            raise ConfigError(f"--repo {r[:80]!r} has an empty, '.' or '..' part; give a repository id or glob such as team/*")
        if r.endswith("+ephemeral"):  # a request names the repository, and the namespace apart
            raise ConfigError(f"--repo {r[:80]!r} names the ephemeral namespace, which is no repository: "
                              f"give --repo {r[:-len('+ephemeral')][:80]} (with --ephemeral-only for that namespace alone)")
        if r.endswith(".git"):  # git's URL suffix, which helpers take off before they ask
            raise ConfigError(f"--repo {r[:80]!r} ends in .git: give the repository id without it, --repo {r[:-4][:80]}")
    scopes = parse_scopes(data.get("scopes") or "git:read", "--scopes")
    max_ttl = data.get("max_ttl", 900)
    if not isinstance(max_ttl, int):
        raise ConfigError(f"--max-ttl must be a whole number of seconds, not {max_ttl!r}")
    check_ttl(max_ttl, "--max-ttl")
    refs = ref_policy(data.get("refs") or [])
    return Terms(list(repos), scopes, max_ttl, flag(data, "ephemeral_only"), [[p, list(ops)] for p, ops in refs])


def flag(data: Mapping[str, object], key: str) -> bool:
    """A true/false field of an admin request: JSON's own booleans only ("no" is not false)."""
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false")
    return value


def clamp_for_owner(req: TokenRequest, cfg: Config, sub: str) -> Decision:
    """The owner signs what the local key would: the request as asked, TTL defaulted.

    A narrow request comes from a helper that left the decision to the agent (the
    environment named it, discovery.agent_named): it gets what the agent's own
    configuration allows for that repository and namespace, the least privilege the
    helper would have applied itself, or Refused naming the setting to change.
    """
    scopes = req.scopes
    if req.narrow:
        try:
            scopes = cfg.narrow(req.repo, req.ephemeral, req.scopes, agent=True)
        except PolicyError as e:
            raise Refused(403, str(e)) from None
    ttl = req.ttl if req.ttl is not None else cfg.ttl
    return Decision(
        repo=req.repo,
        scopes=scopes,
        ttl=ttl,
        refs=[(p, list(ops)) for p, ops in req.refs],
        sub=sub,
    )
