"""Trust policies: which workload identities may exchange their provider's token for ours.

A trust policy says: tokens from this issuer, for this audience, whose claims match
these patterns, may get what a grant with these terms (repos, scopes, max TTL,
ephemeral-only, ref rules) could get. The terms are validated by `policy.parse_terms`
and enforced by `policy.clamp_to_grant`, the very code grants use: a policy can never
hand out more than a grant could. The minted token's `sub` is rendered from the
workload's claims (`--sub-template`), so Code Storage's logs and our audit trail say
which workload pushed.

Exchange: a helper sends `Authorization: Identity <jwt>` with an ordinary token
request. The token is verified (identity.py) against the issuers the policies name;
then each policy for that issuer is tried in order: audience, identity-token lifetime,
every claim condition, then the grant clamp. The first that passes decides. A refusal
names the condition that failed in each policy (never the token), and every exchange,
granted or refused, is an audit line with the issuer, the subject and the claims the
policy matched.

Policies live in the agent's database (`db.py`, table `trust_policies`), next to the
grants: SQLite in the state dir, or the PostgreSQL every replica of a fleet shares. Adding
and removing are one committed transaction each, with their audit row, before the owner
is answered. Every exchange reads the table (no cache: an exchange is one indexed read,
and a policy removed on any replica refuses the very next exchange on all of them); a
store that cannot be read refuses the exchange (fail closed). A `trust.json` left by
earlier versions is imported on first start and kept as `trust.json.migrated`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

from .. import jsontext
from ..errors import CodestoreError, ConfigError, Refused
from ..files import open_regular
from ..vocab import MIN_TTL
from . import db, policy
from .audit import Change, told, withdraw
from .db import Database, StoreError, Tx
from .identity import Identity, Verifier, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..vocab import TokenRequest
    from .server import Agent, Caller


SCHEME = "Identity"
DEFAULT_SUB_TEMPLATE = "oidc:{sub}"
DEFAULT_MAX_IDENTITY_LIFETIME = 3600
MAX_IDENTITY_LIFETIME = 7 * 86400
# Registered claims have their own options (--issuer, --audience) or are checked by the verifier.
RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "iat", "nbf", "jti"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
MAX_SUB = 200


def _claim_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 100 or not name.isprintable() or "{" in name or "}" in name:
        raise ConfigError(f"{where}: a claim name must be short printable text, not {name!r}")
    return name


def _claim_text(value: object) -> list[str] | None:
    """A claim's value as the strings a pattern is matched against (any element of a list)."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (str, int, float)):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    return None


@dataclass
class TrustPolicy:
    id: str
    issuer: str
    audience: str
    claims: list[list[str]]  # [[name, glob pattern], ...]: all must match
    repos: list[str]
    scopes: list[str]
    max_ttl: int
    ephemeral_only: bool = False
    refs: list[list[object]] = field(default_factory=list)
    sub_template: str = DEFAULT_SUB_TEMPLATE
    max_identity_lifetime: int = DEFAULT_MAX_IDENTITY_LIFETIME
    created_at: int = 0

    @property
    def label(self) -> str:
        return f"trust policy {self.id}"

    def public(self) -> dict[str, object]:
        return asdict(self)

    def mismatch(self, identity: Identity) -> str | None:
        """The first condition this identity fails, in words (claim values shortened), or None."""
        aud = identity.claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self.audience not in auds:
            return f"audience is not {self.audience}"
        if identity.lifetime > self.max_identity_lifetime:
            return (f"the identity token lives {identity.lifetime}s, longer than the policy's "
                    f"--max-identity-lifetime of {self.max_identity_lifetime}s")
        for name, pattern in self.claims:
            values = _claim_text(identity.claims.get(name))
            if values is None:
                return f"claim {name} is missing (wanted {pattern})"
            if not any(fnmatch.fnmatchcase(v, pattern) for v in values):
                return f"claim {name} is {printable(' '.join(values), 80)!r}, not {pattern}"
        return None

    def matched_claims(self, identity: Identity) -> dict[str, object]:
        """The claims this policy's conditions looked at, for the audit line (shortened, printable)."""
        out: dict[str, object] = {}
        for name, _ in self.claims:
            values = _claim_text(identity.claims.get(name)) or []
            shown = [printable(v, 200) for v in values[:20]]
            out[name] = shown[0] if len(shown) == 1 and not isinstance(identity.claims.get(name), list) else shown
        return out

    def render_sub(self, identity: Identity) -> str:
        def one(m: re.Match[str]) -> str:
            values = _claim_text(identity.claims.get(m.group(1)))
            if values is None or len(values) != 1:
                raise Refused(403, f"{self.label}: claim {m.group(1)} for --sub-template is missing or not a single value")
            return values[0]

        sub = _PLACEHOLDER.sub(one, self.sub_template)
        if not sub or len(sub) > MAX_SUB or not sub.isprintable():
            raise Refused(403, f"{self.label}: the workload's sub would be empty, over {MAX_SUB} characters or unprintable")
        return sub


@dataclass(frozen=True)
class Bound:
    """A trust policy applied to one verified workload: what `policy.clamp_to_grant` sees.

    It expires with the identity token, so no token minted under it outlives that token.
    """

    id: str
    label: str
    repos: list[str]
    scopes: list[str]
    max_ttl: int
    sub: str
    expires_at: int | None
    ephemeral_only: bool
    refs: list[list[object]]

    def state(self, now: float | None = None) -> str:
        return "active"  # expiry is handled by clamp_to_grant through expires_at


POLICY_FIELDS = policy.TERMS | {"issuer", "audience", "claims", "sub_template", "max_identity_lifetime"}  # POST /v1/trust


def parse_policy(data: object) -> TrustPolicy:
    """A `POST /v1/trust` body -> a new policy; ConfigError names the option to fix."""
    if not isinstance(data, Mapping):
        raise ConfigError("a trust policy must be a JSON object")
    policy.only_known(data, POLICY_FIELDS, "a trust policy")
    issuer = data.get("issuer")
    if not isinstance(issuer, str) or not re.fullmatch(r"https://[!-~]+", issuer) or not re.fullmatch(r"https://[^/?#@]+(/[^?#]*)?", issuer):
        raise ConfigError("--issuer must be the issuer's https:// URL exactly as its tokens' iss claim says it")
    audience = data.get("audience")
    if not isinstance(audience, str) or not audience or len(audience) > 300 or not audience.isprintable():
        raise ConfigError("--audience is required: the aud the workload's tokens carry (e.g. the agent's URL)")
    claims_raw = data.get("claims")
    if not isinstance(claims_raw, list) or not claims_raw:
        # Without a condition, every workload of the issuer (every GitHub repository in the
        # world, for GitHub: the audience is the requester's choice) would be trusted.
        raise ConfigError("a trust policy needs at least one --claim NAME=PATTERN (e.g. --claim repository_owner=acme)")
    claims = []
    for c in claims_raw:
        if not isinstance(c, (list, tuple)) or len(c) != 2:
            raise ConfigError("--claim wants NAME=PATTERN")
        name, pattern = _claim_name(c[0], "--claim"), c[1]
        if name in RESERVED_CLAIMS:
            raise ConfigError(f"--claim {name}: use --issuer/--audience; exp, iat, nbf are checked for every token")
        if not isinstance(pattern, str) or not pattern or len(pattern) > 300 or not pattern.isprintable():
            raise ConfigError(f"--claim {name}=: the pattern must be non-empty printable text")
        claims.append([name, pattern])
    if all(set(pattern) <= set("*?") for _, pattern in claims):
        # `--claim sub=*` matches every workload of the issuer, as no condition would.
        raise ConfigError("every --claim pattern matches anything; at least one must name something (e.g. --claim repository_owner=acme)")
    template = data.get("sub_template") or DEFAULT_SUB_TEMPLATE
    if not isinstance(template, str) or len(template) > MAX_SUB or not template.isprintable():
        raise ConfigError("--sub-template must be short printable text such as 'github:{repository}@{ref}'")
    for name in _PLACEHOLDER.findall(template):
        _claim_name(name, "--sub-template")
    if _PLACEHOLDER.sub("", template).count("{") or _PLACEHOLDER.sub("", template).count("}"):
        raise ConfigError("--sub-template: unbalanced { }; placeholders look like {claim_name}")
    lifetime = data.get("max_identity_lifetime") or DEFAULT_MAX_IDENTITY_LIFETIME
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or not 60 <= lifetime <= MAX_IDENTITY_LIFETIME:
        raise ConfigError(f"--max-identity-lifetime must be 60s..{MAX_IDENTITY_LIFETIME // 86400}d")
    terms = policy.parse_terms(data)  # exactly what a grant may carry, checked by the grant's code
    return TrustPolicy(
        id=pysecrets.token_hex(6), issuer=issuer, audience=audience, claims=claims,
        repos=terms.repos, scopes=list(terms.scopes), max_ttl=terms.max_ttl,
        ephemeral_only=terms.ephemeral_only, refs=terms.refs, sub_template=template,
        max_identity_lifetime=lifetime, created_at=int(time.time()),
    )


db.register("trust", [
    """
    CREATE TABLE trust_policies (
        id TEXT PRIMARY KEY,
        issuer TEXT NOT NULL,
        audience TEXT NOT NULL,
        claims TEXT NOT NULL,
        repos TEXT NOT NULL,
        scopes TEXT NOT NULL,
        max_ttl INTEGER NOT NULL,
        ephemeral_only INTEGER NOT NULL DEFAULT 0,
        refs TEXT NOT NULL DEFAULT '[]',
        sub_template TEXT NOT NULL,
        max_identity_lifetime INTEGER NOT NULL,
        created_at {bigint} NOT NULL
    );
    CREATE INDEX trust_policies_created ON trust_policies (created_at, id)
    """,
])

_COLUMNS = tuple(f.name for f in fields(TrustPolicy))
_JSON = frozenset({"claims", "repos", "scopes", "refs"})
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM trust_policies"


def _row(p: TrustPolicy) -> tuple[object, ...]:
    return tuple(json.dumps(getattr(p, n)) if n in _JSON else int(p.ephemeral_only) if n == "ephemeral_only" else getattr(p, n)
                 for n in _COLUMNS)


def _policy(row: Sequence[object]) -> TrustPolicy:
    values = {n: jsontext.loads(v) if n in _JSON else bool(v) if n == "ephemeral_only" else v  # type: ignore[arg-type]
              for n, v in zip(_COLUMNS, row, strict=True)}
    return TrustPolicy(**values)  # type: ignore[arg-type]


def _no_audit(tx: Tx, p: TrustPolicy) -> None:
    pass


class TrustStore:
    """Trust policies in the agent's database (the grants' `Database`; see the module doc)."""

    def __init__(self, database: Database, state_dir: str) -> None:
        self.db = database
        self.legacy_path = os.path.join(state_dir, "trust.json")

    def open(self) -> TrustStore:
        """Import the trust file of earlier versions once, losing nothing."""
        try:
            with open_regular(self.legacy_path, "the old trust policies") as f:
                raw = jsontext.loads(f.read())
            old = [TrustPolicy(**p) for p in raw["policies"]]
        except FileNotFoundError:
            return self
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Refuse to start rather than serve with a policy set we could not read.
            raise ConfigError(f"cannot migrate the trust policies in {self.legacy_path} ({type(e).__name__}); fix or move it") from None
        try:
            with self.db.transaction() as tx:
                for p in old:
                    if not tx.execute("SELECT 1 FROM trust_policies WHERE id = ?", (p.id,)):  # imported before a crash
                        self._insert(tx, p)
        except StoreError as e:
            raise ConfigError(f"cannot import {self.legacy_path}: {e}") from None
        os.replace(self.legacy_path, self.legacy_path + ".migrated")
        return self

    @staticmethod
    def _insert(tx: Tx, p: TrustPolicy) -> None:
        tx.execute(f"INSERT INTO trust_policies ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", _row(p))

    def add(self, p: TrustPolicy, audit: Callable[[Tx, TrustPolicy], None] = _no_audit) -> None:
        """Durable (with its audit row) when this returns; StoreError and nothing kept otherwise."""
        with self.db.transaction() as tx:
            self._insert(tx, p)
            audit(tx, p)

    def remove(self, pid: str, audit: Callable[[Tx, TrustPolicy], None] = _no_audit) -> TrustPolicy | None:
        """Delete durably (with its audit row); None when there is no such policy."""
        with self.db.transaction() as tx:
            # One statement: of two replicas removing the same policy at once, one removes it
            # (and writes the audit row), the other hears "no such policy".
            rows = tx.execute(f"DELETE FROM trust_policies WHERE id = ? RETURNING {', '.join(_COLUMNS)}", (pid,))
            if not rows:
                return None
            p = _policy(rows[0])
            audit(tx, p)
        return p

    def all(self) -> list[TrustPolicy]:
        """Every policy as committed now, oldest first; StoreError when the store cannot say."""
        with self.db.transaction(write=False) as tx:
            return [_policy(r) for r in tx.execute(f"{_SELECT} ORDER BY created_at, id")]


class Trust:
    """The agent's workload-identity exchange and the admin calls that manage its policies."""

    def __init__(self, store: TrustStore, verifier: Verifier) -> None:
        self.store = store
        self.verifier = verifier

    @staticmethod
    def presented(authorization: str | None) -> bool:
        return authorization is not None and authorization.partition(" ")[0] == SCHEME

    def exchange(self, agent: Agent, caller: Caller, authorization: str, request: TokenRequest,
                 data: Mapping[str, object]) -> tuple[int, dict[str, object]]:
        """Mint for `request` under the first policy that admits the identity; `data` is for the audit line."""
        who: dict[str, object] = {"grant": None, "via": caller.transport, "peer": caller.peer}
        try:
            req = policy.check_request(request)
        except Refused as e:
            return agent._refuse(who, data, e.reason, e.status)
        try:
            policies, identity = self._verify(authorization)
        except Refused as e:
            return agent._refuse(who, data, e.reason, e.status)
        who.update({"issuer": identity.issuer, "subject": identity.subject})
        left = identity.expires_at - int(time.time())
        if left < MIN_TTL:
            return agent._refuse(who, data, f"the identity token expires in {left}s, too soon to mint a token; get a fresh one", 401)
        failures = []
        for p in (p for p in policies if p.issuer == identity.issuer):
            why = p.mismatch(identity)
            if why is not None:
                failures.append(f"{p.label}: {why}")
                continue
            try:
                bound = Bound(p.id, p.label, p.repos, p.scopes, p.max_ttl, p.render_sub(identity),
                              identity.expires_at, p.ephemeral_only, p.refs)
                decision = policy.clamp_to_grant(bound, req, agent.cfg.ttl)
            except Refused as e:
                failures.append(e.reason)
                continue
            who.update({"policy": p.id, "claims": p.matched_claims(identity)})
            return agent.issue(decision, req, who, data)
        reason = "; ".join(failures) if failures else f"no trust policy for {identity.issuer}"
        return agent._refuse(who, data, f"no trust policy admits this workload ({reason[:600]})", 403)

    def _verify(self, authorization: str) -> tuple[list[TrustPolicy], Identity]:
        """Every policy as committed now, and the presented identity verified against them."""
        token = authorization.partition(" ")[2].strip()
        try:
            policies = self.store.all()  # every exchange reads the store: a removal counts at once
        except CodestoreError as e:
            raise Refused(503, f"cannot read the trust policies ({e}); try again") from None  # fail closed
        trusted: dict[str, set[str]] = {}
        for p in policies:
            trusted.setdefault(p.issuer, set()).add(p.audience)
        return policies, self.verifier.verify(token, trusted)

    def reporter(self, authorization: str, repo: str) -> dict[str, object]:
        """Who reports a push to `repo` with a workload identity (agent/report.py), or Refused.

        The identity must verify and a trust policy must admit it now and cover the
        repository: the `sub` it would have minted under is the one recorded, with the
        policy, issuer and subject, as on the mint line.
        """
        policies, identity = self._verify(authorization)
        for p in policies:
            if p.issuer == identity.issuer and p.mismatch(identity) is None and policy.covers(p.repos, repo):
                return {"grant": None, "sub": p.render_sub(identity), "policy": p.id,
                        "issuer": identity.issuer, "subject": identity.subject}
        raise Refused(403, f"no trust policy admits this workload for repository {repo!r}")

    # -- administration (owner only; the router checks) ----------------------------------

    def add(self, agent: Agent, data: object) -> tuple[int, dict[str, object]]:
        try:
            p = parse_policy(data)
        except CodestoreError as e:
            return 400, {"error": str(e)}
        audit: Change[TrustPolicy] = Change(agent.audit, "trust-add", lambda p: {k: v for k, v in p.public().items() if k != "created_at"})
        try:
            self.store.add(p, audit=audit)
        except StoreError as e:
            return 503, {"error": f"no trust policy was added: {e}; try again"}
        return 201, told(p.public(), f"{p.label} was added", audit.after())

    def remove(self, agent: Agent, pid: str) -> tuple[int, dict[str, object]]:
        return withdraw(agent.audit, "trust-remove", lambda p: {"id": p.id, "issuer": p.issuer},
                        lambda audit: self.store.remove(pid, audit=audit),
                        name=f"trust policy {pid}", listing="trust", verb="removed", done="was removed")

    def list(self) -> tuple[int, dict[str, object]]:
        try:
            return 200, {"policies": [p.public() for p in self.store.all()]}
        except StoreError as e:
            return 503, {"error": f"cannot read the trust policies: {e}; try again"}
