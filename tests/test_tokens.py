"""Token minting and verification with Code Storage's rules."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from git_credential_codestore import keys, tokens
from git_credential_codestore.errors import TokenError
from git_credential_codestore.secrets import Secret, Token


def mint(key: tokens.PrivateKey, **kw: Any) -> Token:
    args: dict[str, Any] = dict(org="acme", repo="team/app", scopes=["git:read"], ttl=300, sub="tester", kid="k1")
    args.update(kw)
    return tokens.mint(key, **args)


@pytest.mark.parametrize("kind,alg", [("ec", "ES256"), ("rsa", "RS256"), ("ed25519", "EdDSA")])
def test_algorithm_is_chosen_from_the_key(kind: str, alg: str) -> None:
    key = keys.generate(kind)
    t = mint(key).reveal()
    assert jwt.get_unverified_header(t) == {"alg": alg, "typ": "JWT", "kid": "k1"}
    assert tokens.verify(t, {"k1": key.public_key()}, org="acme").repo == "team/app"


def test_claims_are_the_code_storage_set() -> None:
    key = keys.generate("ec")
    now = int(time.time())
    t = mint(key, refs=[("refs/heads/main", ["no-push"])], now=now)
    c = jwt.decode(t.reveal(), options={"verify_signature": False})
    assert c == {
        "iss": "acme", "sub": "tester", "repo": "team/app", "scopes": ["git:read"],
        "iat": now, "exp": now + 300, "refs": [["refs/heads/main", ["no-push"]]],
    }
    assert t.expires_at == now + 300


def test_kid_is_omitted_when_not_configured() -> None:
    assert "kid" not in jwt.get_unverified_header(mint(keys.generate("ec"), kid=None).reveal())


@pytest.mark.parametrize("ttl", [0, 29, 3601, 31536000])
def test_ttl_outside_the_hard_bounds_is_refused(ttl: int) -> None:
    # Threat: a year-long token, the very thing codestore exists to replace.
    with pytest.raises(TokenError):
        mint(keys.generate("ec"), ttl=ttl)


def test_unknown_scopes_are_refused() -> None:
    with pytest.raises(TokenError, match="admin"):
        mint(keys.generate("ec"), scopes=["admin"])


def test_token_repr_and_str_never_show_the_value() -> None:
    t = mint(keys.generate("ec"))
    assert t.reveal() not in repr(t) and t.reveal() not in str(t) and t.reveal() not in f"{t}"
    assert "eyJ" not in repr([t]) and "eyJ" not in repr({"t": t})


def test_secret_cannot_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_verify_refuses_alg_none() -> None:
    # Threat: an unsigned token accepted as valid.
    key = keys.generate("ec")
    now = int(time.time())
    t = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"iss": "acme", "repo": "r", "scopes": ["git:write"], "iat": now, "exp": now + 60}) + "."
    with pytest.raises(TokenError, match="not accepted"):
        tokens.verify(t, {"k": key.public_key()}, org="acme")


def test_verify_refuses_hmac_signed_with_the_public_key() -> None:
    # Threat: key confusion, HS256 keyed with the (public) verification key.
    key = keys.generate("ec")
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64({"iss": "acme", "repo": "r", "scopes": ["git:write"], "iat": now, "exp": now + 60})
    import hashlib
    import hmac

    sig = base64.urlsafe_b64encode(hmac.new(pub, f"{header}.{payload}".encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="not accepted"):
        tokens.verify(f"{header}.{payload}.{sig}", {"k": key.public_key()}, org="acme")


def test_verify_refuses_expired_tokens_beyond_the_leeway() -> None:
    key = keys.generate("ec")
    t = mint(key, now=int(time.time()) - 300 - tokens.LEEWAY - 5).reveal()
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(t, {"k1": key.public_key()}, org="acme")


def test_verify_accepts_small_clock_skew() -> None:
    key = keys.generate("ec")
    t = mint(key, now=int(time.time()) + 10).reveal()
    assert tokens.verify(t, {"k1": key.public_key()}, org="acme").iss == "acme"


def _signed(key: tokens.PrivateKey, headers: dict[str, object] | None = None, **claims: object) -> str:
    """A token signed by `key` (PyJWT's encoder) with extra header fields or claims."""
    now = int(time.time())
    body = {"iss": "acme", "sub": "s", "repo": "team/app", "scopes": ["git:read"], "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1", **(headers or {})})


@pytest.mark.parametrize(
    ("headers", "named"),
    [({"crit": ["x-ext"], "x-ext": 1}, "'x-ext'"), ({"crit": ["b64"], "b64": False}, "'b64'")],
)
def test_verify_refuses_critical_extensions_naming_them(headers: dict[str, object], named: str) -> None:
    # PyJWT refused an unknown one as "not a JWT", and b64=false as a decode error.
    key = keys.generate("ec")
    with pytest.raises(TokenError, match=rf"critical \(crit: {named}\).*without crit"):
        tokens.verify(_signed(key, headers), {"k1": key.public_key()}, org="acme")


def test_verify_holds_nbf_to_the_same_leeway_as_iat() -> None:
    key = keys.generate("ec")
    now = int(time.time())
    with pytest.raises(TokenError, match=r"not valid for another \d+s \(nbf\); check the clock"):
        tokens.verify(_signed(key, nbf=now + tokens.LEEWAY + 60), {"k1": key.public_key()}, org="acme")
    assert tokens.verify(_signed(key, nbf=now + 10), {"k1": key.public_key()}, org="acme").repo == "team/app"
    with pytest.raises(TokenError, match="nbf must be an integer"):
        tokens.verify(_signed(key, nbf="soon"), {"k1": key.public_key()}, org="acme")


def test_verify_refuses_a_token_for_another_audience_saying_so() -> None:
    key = keys.generate("ec")
    with pytest.raises(TokenError, match=r"audience 'https://elsewhere', which this server is not"):
        tokens.verify(_signed(key, aud="https://elsewhere"), {"k1": key.public_key()}, org="acme")


def test_verify_refuses_a_token_signed_by_an_unregistered_key() -> None:
    t = mint(keys.generate("ec")).reveal()
    with pytest.raises(TokenError, match="unregistered"):
        tokens.verify(t, {"k1": keys.generate("ec").public_key()}, org="acme")


def test_verify_refuses_an_unknown_kid() -> None:
    key = keys.generate("ec")
    with pytest.raises(TokenError, match="unknown kid"):
        tokens.verify(mint(key, kid="k9").reveal(), {"k1": key.public_key()}, org="acme")


def test_verify_refuses_another_org() -> None:
    key = keys.generate("ec")
    with pytest.raises(TokenError, match="issuer"):
        tokens.verify(mint(key, org="other").reveal(), {"k1": key.public_key()}, org="acme")


def test_verify_refuses_an_algorithm_that_does_not_match_the_registered_key() -> None:
    ec_key, ed_key = keys.generate("ec"), keys.generate("ed25519")
    with pytest.raises(TokenError):
        tokens.verify(mint(ed_key).reveal(), {"k1": ec_key.public_key()}, org="acme")


def test_verify_errors_never_contain_the_token() -> None:
    key = keys.generate("ec")
    t = mint(key, org="other").reveal()
    with pytest.raises(TokenError) as e:
        tokens.verify(t, {"k1": key.public_key()}, org="acme")
    assert t not in str(e.value) and "eyJ" not in str(e.value)


def test_non_p256_curves_are_refused() -> None:
    with pytest.raises(TokenError, match="P-256"):
        mint(ec.generate_private_key(ec.SECP384R1()))


def test_tokens_minted_by_the_official_sdk_verify_like_ours() -> None:
    from pierre_storage.auth import generate_jwt

    key = keys.generate("ec")
    sdk = generate_jwt(keys.private_pem(key).reveal(), "acme", "team/app", ["git:read"], 300)
    c = tokens.verify(sdk, {"only": key.public_key()}, org="acme")
    assert (c.repo, c.scopes, c.sub) == ("team/app", ("git:read",), "@pierre/storage")


def test_token_type_carries_its_expiry() -> None:
    assert Token("x", 5).expires_at == 5


def test_sdk_ref_policies_verify_with_short_patterns_star_and_explicit_allows() -> None:
    from pierre_storage.auth import generate_jwt

    key = keys.generate("ec")
    from pierre_storage.types import Refs

    refs: Refs = [{"pattern": "main", "ops": ["no-push"]}, {"pattern": "feat/*"}, {"pattern": "*", "ops": ["no-force-push"]}]
    sdk = generate_jwt(keys.private_pem(key).reveal(), "acme", "team/app", ["git:write"], 300, refs=refs)
    c = tokens.verify(sdk, {"only": key.public_key()}, org="acme")
    assert c.refs == [("refs/heads/main", ["no-push"]), ("refs/heads/feat/*", []), ("*", ["no-force-push"])]


def test_the_legacy_ops_claim_is_a_star_rule_after_the_refs_rules() -> None:
    # Threat: `ops: ["no-force-push"]` (the SDK's deprecated form) silently ignored.
    from pierre_storage.auth import generate_jwt

    key = keys.generate("ec")
    pem = keys.private_pem(key).reveal()
    only_ops = generate_jwt(pem, "acme", "team/app", ["git:write"], 300, ops=["no-force-push"])
    assert tokens.verify(only_ops, {"k": key.public_key()}, org="acme").refs == [("*", ["no-force-push"])]
    both = generate_jwt(pem, "acme", "team/app", ["git:write"], 300, ops=["no-push"], refs=[{"pattern": "main", "ops": []}])
    assert tokens.verify(both, {"k": key.public_key()}, org="acme").refs == [("refs/heads/main", []), ("*", ["no-push"])]


def test_a_token_without_a_repo_claim_verifies_with_an_empty_repo() -> None:
    # org-wide tokens (org:read) need not name a repository; every repository check then fails.
    import jwt as pyjwt

    key = keys.generate("ec")
    now = int(time.time())
    t = pyjwt.encode({"iss": "acme", "scopes": ["org:read"], "iat": now, "exp": now + 60}, key, algorithm="ES256")
    assert tokens.verify(t, {"k": key.public_key()}, org="acme").repo == ""


def test_verify_reads_code_storages_short_names_and_the_legacy_ops_claim() -> None:
    # Tokens from the official SDK may use `main` for refs/heads/main, and its deprecated
    # top-level `ops`, which means a catch-all rule after any `refs` rules.
    key = keys.generate("ec")
    now = int(time.time())
    claims = {"iss": "acme", "sub": "sdk", "repo": "team/app", "scopes": ["git:write"], "iat": now, "exp": now + 60,
              "refs": [["main", ["no-push"]]], "ops": ["no-force-push"]}
    t = jwt.encode(claims, key, algorithm="ES256")
    assert tokens.verify(t, {"k1": key.public_key()}, org="acme").refs == [("refs/heads/main", ["no-push"]), ("*", ["no-force-push"])]


def test_minted_ref_rules_are_written_in_full() -> None:
    key = keys.generate("ec")
    t = mint(key, refs=[("main", ["no-push"]), ("*", [])]).reveal()
    assert tokens.verify(t, {"k1": key.public_key()}, org="acme").refs == [("refs/heads/main", ["no-push"]), ("*", [])]
