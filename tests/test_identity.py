"""Verifying workload identity tokens against a real HTTPS issuer on loopback.

The verifier runs in-process (its key cache is what is under test), the issuer is a
real server: discovery and JWKS over TLS with a CA generated for this run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import jwt
import pytest

from git_credential_codestore.agent import identity, policy, trust
from git_credential_codestore.agent.identity import Verifier, https_fetcher
from git_credential_codestore.agent.workload import find_identity
from git_credential_codestore.errors import ConfigError
from git_credential_codestore.vocab import TokenRequest
from tests.oidc_issuer import CertAuthority, Issuer, hs256, make_ca, new_key, raw_jwt, start_issuer

AUD = "https://agent.example:8765"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(ca: CertAuthority, clock: Clock) -> Verifier:
    return Verifier(https_fetcher(str(ca.cert)), fresh=60, stale_grace=3600, refetch_interval=30, clock=clock)


def trusted(i: Issuer, aud: str = AUD) -> dict[str, set[str]]:
    return {i.url: {aud}}


def refused(v: Verifier, token: str, t: dict[str, set[str]]) -> str:
    with pytest.raises(policy.Refused) as e:
        v.verify(token, t)
    assert token not in e.value.reason
    return e.value.reason


# -- what is accepted ----------------------------------------------------------------------


def test_a_modal_shaped_token_verifies_and_its_claims_come_back(issuer: Issuer, verifier: Verifier) -> None:
    claims = issuer.modal_claims(aud=AUD)
    ident = verifier.verify(issuer.sign(claims), trusted(issuer))
    assert ident.issuer == issuer.url
    assert ident.claims["workspace_id"] == "ac-12345abcd"
    assert ident.subject.startswith("modal:workspace_id:ac-12345abcd:")
    assert ident.lifetime == 172800 and ident.expires_at == claims["exp"]


def test_keys_are_discovered_through_the_issuers_discovery_document_over_https(issuer: Issuer, verifier: Verifier) -> None:
    verifier.verify(issuer.sign(issuer.github_token_claims(AUD)), trusted(issuer))
    assert issuer.requests == ["/.well-known/openid-configuration", "/jwks"]


def test_an_issuer_with_a_path_is_discovered_below_its_path(ca: CertAuthority, verifier: Verifier) -> None:
    with start_issuer(ca, path="/_services/token") as i:
        verifier.verify(i.sign(i.github_token_claims(AUD)), trusted(i))
        assert i.requests[0] == "/_services/token/.well-known/openid-configuration"


# -- forgeries -------------------------------------------------------------------------------


def test_a_wrong_issuer_is_refused_before_anything_is_fetched(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: a token naming an issuer the owner never trusted (and the agent fetching its keys).
    token = issuer.sign(issuer.github_token_claims(AUD, iss="https://evil.example"))
    assert "no trust policy trusts identity tokens from https://evil.example" in refused(verifier, token, trusted(issuer))
    assert issuer.requests == []


def test_a_wrong_audience_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: a token minted for another relying party replayed at the agent.
    token = issuer.sign(issuer.github_token_claims("https://github.com/acme"))
    assert "audience" in refused(verifier, token, trusted(issuer))


def test_an_expired_token_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: a leaked old identity token.
    token = issuer.sign(issuer.github_token_claims(AUD, issued=int(time.time()) - 400, lifetime=300))
    assert "expired" in refused(verifier, token, trusted(issuer))


def test_a_token_not_yet_valid_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: a token minted ahead of time (skewed or compromised issuer clock).
    token = issuer.sign(issuer.github_token_claims(AUD, nbf=int(time.time()) + 600))
    assert "not valid yet" in refused(verifier, token, trusted(issuer))


def test_small_clock_skew_is_tolerated(issuer: Issuer, verifier: Verifier) -> None:
    token = issuer.sign(issuer.github_token_claims(AUD, issued=int(time.time()) + 10))
    verifier.verify(token, trusted(issuer))


def test_alg_none_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: an unsigned token.
    token = raw_jwt({"alg": "none", "typ": "JWT", "kid": issuer.current.kid}, issuer.github_token_claims(AUD))
    assert "signed with none are not accepted" in refused(verifier, token, trusted(issuer))


def test_hs256_keyed_with_the_public_jwks_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: algorithm confusion: HMAC with the issuer's public key material as the secret.
    claims = issuer.github_token_claims(AUD)
    header: dict[str, object] = {"alg": "HS256", "typ": "JWT", "kid": issuer.current.kid}
    for secret in (json.dumps(issuer.jwks()).encode(), json.dumps(issuer.current.jwk()).encode(),
                   jwt.algorithms.RSAAlgorithm.to_jwk(issuer.current.key.public_key()).encode()):
        assert "signed with HS256 are not accepted" in refused(verifier, hs256(header, claims, secret), trusted(issuer))


@pytest.mark.parametrize("param", ["jku", "x5u", "jwk", "x5c"])
def test_a_key_named_by_the_tokens_own_header_is_refused(issuer: Issuer, verifier: Verifier, param: str) -> None:
    # Threat: the forger's own key, offered inline or by URL, in place of the issuer's.
    forger = new_key()
    value: object = {"jku": "https://evil.example/jwks", "x5u": "https://evil.example/cert.pem",
                     "jwk": forger.jwk(), "x5c": ["MIIB"]}[param]
    token = issuer.sign(issuer.github_token_claims(AUD), key=forger, header={param: value})
    assert f"names its own key ({param})" in refused(verifier, token, trusted(issuer))
    assert issuer.requests == []


def test_a_token_signed_by_a_key_the_issuer_does_not_publish_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    # Threat: a forger reusing the issuer's kid with its own key.
    forger = new_key()
    forger.kid = issuer.current.kid
    token = issuer.sign(issuer.github_token_claims(AUD), key=forger)
    assert "signature does not verify" in refused(verifier, token, trusted(issuer))


def test_a_token_without_exp_or_iat_is_refused(issuer: Issuer, verifier: Verifier) -> None:
    for claim in ("exp", "iat"):
        claims = issuer.github_token_claims(AUD)
        del claims[claim]
        assert f"no {claim} claim" in refused(verifier, issuer.sign(claims), trusted(issuer))


def test_a_token_from_one_issuer_cannot_pass_as_another_trusted_issuer(ca: CertAuthority, issuer: Issuer, verifier: Verifier) -> None:
    # Threat: issuer B's workload (or B itself) signing a token that claims issuer A.
    with start_issuer(ca) as other:
        token = other.sign(other.github_token_claims(AUD, iss=issuer.url))  # B's key, A's name
        both = {issuer.url: {AUD}, other.url: {AUD}}
        assert "signature does not verify" in refused(verifier, token, both) or "does not publish" in refused(verifier, token, both)


# -- the key cache -----------------------------------------------------------------------------


def test_a_rotated_key_is_fetched_when_a_token_names_it(issuer: Issuer, verifier: Verifier) -> None:
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    issuer.rotate()
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    assert issuer.fetches() == 2


def test_an_unknown_kid_fails_closed_and_refetches_at_most_once_per_interval(issuer: Issuer, verifier: Verifier, clock: Clock) -> None:
    # Threat: forged kids making the agent hammer the issuer, or accept a key it cannot see.
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    stranger = new_key()
    for _ in range(3):
        reason = refused(verifier, issuer.sign(issuer.modal_claims(aud=AUD), key=stranger), trusted(issuer))
        assert f"key id {stranger.kid!r}" in reason
    assert issuer.fetches() == 2  # the first load, then one forced refetch
    clock.now += 31
    refused(verifier, issuer.sign(issuer.modal_claims(aud=AUD), key=stranger), trusted(issuer))
    assert issuer.fetches() == 3


def test_an_issuer_that_is_down_does_not_stop_tokens_whose_keys_are_cached(issuer: Issuer, verifier: Verifier, clock: Clock) -> None:
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    token = issuer.sign(issuer.modal_claims(aud=AUD))
    issuer.stop()
    clock.now += 120  # past freshness: a refetch is tried, fails, and the cached keys serve
    assert verifier.verify(token, trusted(issuer)).issuer == issuer.url


def test_with_the_issuer_down_an_unknown_kid_fails_closed(issuer: Issuer, verifier: Verifier, clock: Clock) -> None:
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    issuer.stop()
    assert "does not publish" in refused(verifier, issuer.sign(issuer.modal_claims(aud=AUD), key=new_key()), trusted(issuer))


def test_cached_keys_are_not_used_beyond_the_stale_grace(issuer: Issuer, verifier: Verifier, clock: Clock) -> None:
    verifier.verify(issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))
    token = issuer.sign(issuer.modal_claims(aud=AUD))
    issuer.stop()
    clock.now += 3601
    assert "cannot get the signing keys" in refused(verifier, token, trusted(issuer))


def test_an_issuer_behind_a_certificate_the_agent_does_not_trust_is_refused(issuer: Issuer, tmp_path: Path) -> None:
    # Threat: keys served by a man in the middle.
    strangers = make_ca(tmp_path / "other-ca", name="not the issuer's CA")
    v = Verifier(https_fetcher(str(strangers.cert)))
    assert "cannot get the signing keys" in refused(v, issuer.sign(issuer.modal_claims(aud=AUD)), trusted(issuer))


def test_keys_are_fetched_over_https_only() -> None:
    with pytest.raises(identity.KeyFetchError, match="not an https"):
        https_fetcher()("http://127.0.0.1:1/jwks")


# -- trust policies: conditions and the workload's sub -----------------------------------------


def make_policy(**over: object) -> trust.TrustPolicy:
    data: dict[str, object] = {
        "issuer": "https://token.actions.githubusercontent.com", "audience": AUD,
        "claims": [["repository", "acme/*"], ["ref", "refs/heads/main"]], "repos": ["team/app"],
        "scopes": ["git:read", "git:write"], "max_ttl": 600, "ephemeral_only": True,
        "sub_template": "github:{repository}@{ref}",
    }
    data.update(over)
    return trust.parse_policy(data)


def ident(**claims: object) -> identity.Identity:
    base: dict[str, object] = {"aud": AUD, "sub": "repo:acme/app:ref:refs/heads/main", "repository": "acme/app", "ref": "refs/heads/main"}
    base.update(claims)
    return identity.Identity("https://token.actions.githubusercontent.com", base, int(time.time()) + 300, 300)


def test_a_policy_names_the_first_condition_a_workload_fails() -> None:
    p = make_policy()
    assert p.mismatch(ident()) is None
    assert p.mismatch(ident(repository="other/app")) == "claim repository is 'other/app', not acme/*"
    assert p.mismatch(ident(ref=None)) == "claim ref is missing (wanted refs/heads/main)"
    assert p.mismatch(ident(aud="x")) == f"audience is not {AUD}"


def test_a_policy_refuses_identity_tokens_that_live_longer_than_it_allows() -> None:
    # Threat: a long-lived identity token, which is a standing secret under another name.
    p = make_policy(max_identity_lifetime=600)
    long_lived = identity.Identity(ident().issuer, ident().claims, int(time.time()) + 300, 7200)
    assert "lives 7200s" in str(p.mismatch(long_lived))


def test_the_minted_sub_names_the_workload_from_its_claims() -> None:
    assert make_policy().render_sub(ident()) == "github:acme/app@refs/heads/main"


def test_the_sub_template_is_not_python_format() -> None:
    # Threat: str.format-style attribute access ({x.__class__}) reaching objects.
    with pytest.raises(ConfigError):
        make_policy(sub_template="{repository.__class__}x{")


@pytest.mark.parametrize("over, message", [
    ({"claims": []}, "at least one --claim"),
    # Threat: a wildcard condition trusting every workload of the issuer (every GitHub repository).
    ({"claims": [["sub", "*"]]}, "matches anything"),
    ({"claims": [["sub", "**"], ["repository", "?*"]]}, "matches anything"),
    ({"issuer": "http://token.actions.githubusercontent.com"}, "https://"),
    ({"audience": ""}, "--audience"),
    ({"claims": [["aud", "x"]]}, "use --issuer/--audience"),
    ({"max_ttl": 7200}, "--max-ttl"),
    ({"scopes": ["git:admin"]}, "unknown scope"),
    ({"repos": []}, "--repo"),
    ({"max_identity_lifetime": 30 * 86400}, "--max-identity-lifetime"),
])
def test_a_policy_is_validated_like_a_grant(over: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        make_policy(**over)


def test_a_policy_is_clamped_by_the_grant_code() -> None:
    p = make_policy()
    bound = trust.Bound(p.id, p.label, p.repos, p.scopes, p.max_ttl, p.render_sub(ident()), int(time.time()) + 100,
                        p.ephemeral_only, p.refs)
    with pytest.raises(policy.Refused, match=f"trust policy {p.id} is ephemeral-only"):
        policy.clamp_to_grant(bound, TokenRequest("team/app", ("git:read",)).checked(), 300)
    d = policy.clamp_to_grant(bound, TokenRequest("team/app", ("git:write",), True).checked(), 300)
    assert d.ttl <= 100  # never outlives the identity token
    assert d.sub == "github:acme/app@refs/heads/main"


# -- helpers find the identity ------------------------------------------------------------------


@pytest.mark.parametrize("env, where", [
    ({"CODESTORE_AGENT_URL": "https://a", "CODESTORE_IDENTITY_TOKEN": "a.b.c", "MODAL_IDENTITY_TOKEN": "d.e.f"}, "CODESTORE_IDENTITY_TOKEN"),
    ({"CODESTORE_AGENT_URL": "https://a", "CODESTORE_IDENTITY_TOKEN_FILE": "/t", "MODAL_IDENTITY_TOKEN": "d.e.f"}, "CODESTORE_IDENTITY_TOKEN_FILE"),
    ({"CODESTORE_AGENT_URL": "https://a", "MODAL_IDENTITY_TOKEN": "d.e.f", "ACTIONS_ID_TOKEN_REQUEST_URL": "https://g",
      "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "x"}, "MODAL_IDENTITY_TOKEN"),
    ({"CODESTORE_AGENT_URL": "https://a", "ACTIONS_ID_TOKEN_REQUEST_URL": "https://g", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "x"},
     "ACTIONS_ID_TOKEN_REQUEST_URL"),
    ({"CODESTORE_AGENT_SOCK": "/s", "MODAL_IDENTITY_TOKEN": "d.e.f"}, None),  # the owner's own agent: no provider identity
    ({"CODESTORE_AGENT_SOCK": "/s", "CODESTORE_IDENTITY_TOKEN": "a.b.c"}, "CODESTORE_IDENTITY_TOKEN"),
    ({"CODESTORE_IDENTITY_TOKEN": "a.b.c"}, None),  # no agent named: nobody to send it to
    ({"CODESTORE_AGENT_URL": "https://a"}, None),
])
def test_helpers_find_the_identity_in_order(env: dict[str, str], where: str | None) -> None:
    found = find_identity(env)
    assert (found.where if found else None) == where


@pytest.mark.parametrize("value", ["a.b.c\r\nX-Evil: 1", "not a jwt", "a.b.c d"])
def test_an_identity_token_that_is_not_a_jwt_is_refused_before_it_reaches_a_header(value: str) -> None:
    # Threat: header injection into the request to the agent.
    found = find_identity({"CODESTORE_AGENT_URL": "https://a", "CODESTORE_IDENTITY_TOKEN": value})
    assert found is not None
    with pytest.raises(ConfigError, match="does not hold an identity token"):
        found.token()


def test_the_audit_line_shows_matched_claims_shortened_and_printable() -> None:
    # Threat: a workload stuffing its claims to flood or garble the audit trail.
    p = make_policy(claims=[["repository", "acme/*"], ["groups", "*"]])
    shown = p.matched_claims(ident(repository="acme/" + "x" * 500 + "\x1b[2J", groups=[f"g{i}" for i in range(100)]))
    assert len(str(shown["repository"])) <= 200 and "\x1b" not in str(shown["repository"])
    assert shown["groups"] == [f"g{i}" for i in range(20)]


def test_github_refusing_the_request_token_is_one_line_naming_the_permission(issuer: Issuer, ca: CertAuthority,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from git_credential_codestore.agent.workload import github_token
    from git_credential_codestore.errors import RemoteError

    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{issuer.url}/github/idtoken?api-version=2.0", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "wrong"}
    with pytest.raises(RemoteError, match="HTTP 401; does the job have `permissions: id-token: write`"):
        github_token(env, AUD)
    env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] = issuer.github_request_token
    token = github_token(env, AUD)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == AUD
    assert issuer.github_audiences == [AUD]


def test_the_github_request_token_never_travels_in_clear_off_loopback() -> None:
    # Threat: the runner's request token sent over plain http to a network host.
    from git_credential_codestore.agent.workload import github_token

    with pytest.raises(ConfigError, match="plain http"):
        github_token({"ACTIONS_ID_TOKEN_REQUEST_URL": "http://10.0.0.1/token", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "t"}, AUD)


def test_an_unreadable_oidc_ca_bundle_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CODESTORE_OIDC_CA_FILE"):
        https_fetcher(str(tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match="CODESTORE_OIDC_CA_FILE"):
        https_fetcher(str(tmp_path / "empty.pem"))


def test_a_pipe_named_as_the_oidc_ca_bundle_is_one_line_not_a_hang(tmp_path: Path) -> None:
    # OpenSSL's cafile= opened a named pipe and waited for a writer for ever (the agent's start).
    os.mkfifo(tmp_path / "ca.pem")
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            https_fetcher(str(tmp_path / "ca.pem"))
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    loading = threading.Thread(target=load, daemon=True)  # a hang fails this test, not the whole run
    loading.start()
    loading.join(10)
    assert not loading.is_alive(), "https_fetcher waited on the pipe"
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError) and "CODESTORE_OIDC_CA_FILE" in str(outcome[0]), outcome
