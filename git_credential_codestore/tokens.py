"""Code Storage-compatible JWTs: minting with the org's key, and verifying them.

The header is `{"alg", "typ": "JWT", "kid"}` with the algorithm chosen from the key
(ES256 for EC P-256, RS256 for RSA, EdDSA for Ed25519); the claims are `iss`, `sub`,
`repo`, `scopes`, `iat`, `exp` and optionally `refs`. Verification applies Code
Storage's rules and is what the dev server and the agent's tests rely on.

Minting needs only `cryptography`: a compact JWS is three base64url parts, and PyJWT's
import (x509, http.client, ssl: ~30 ms) would be paid on every git fetch. Verification,
where a subtle mistake is a vulnerability, goes through PyJWT, imported only there.
"""

from __future__ import annotations

import binascii
import json
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .errors import TokenError
from .records import record
from .secrets import Token
from .vocab import SCOPES, allows, check_ttl, legacy_ops_rule, ref_policy

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Only asymmetric algorithms: accepting HS256 would let anyone who knows the public key
# sign tokens with it (key confusion), and `none` needs no key at all.
ALLOWED_ALGORITHMS = ("ES256", "RS256", "EdDSA")
LEEWAY = 30  # seconds of clock skew tolerated on exp/iat

RefPolicy = list[tuple[str, list[str]]]  # vocab.ref_policy's shape


TYPE_CHECKING = False  # typing's and dataclasses' imports are paid by local-key signing
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Protocol

    class Signer(Protocol):
        """Signs JWS input without handing the key to us: a PKCS#11 token (`hsm.py`), a cloud KMS."""

        algorithm: str  # "ES256" | "RS256"

        def sign(self, data: bytes) -> bytes:
            """The raw JWS signature (r||s for ES256); SignerUnavailable when the signer is gone."""
            ...


class SignerUnavailable(TokenError):
    """The signer (a token, a KMS) could not sign right now; nothing was signed."""


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise TokenError(f"EC keys must use P-256 for ES256, not {key.curve.name}")
        return "ES256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < 2048:
            raise TokenError(f"RSA keys must be at least 2048 bits, not {key.key_size}")
        return "RS256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "EdDSA"
    raise TokenError(f"unsupported key type {type(key).__name__}; use EC P-256, RSA or Ed25519")


def mint(
    key: PrivateKey | Signer,
    *,
    org: str,
    repo: str,
    scopes: Sequence[str],
    ttl: int,
    sub: str,
    kid: str | None = None,
    refs: Sequence[tuple[str, Sequence[str]]] | None = None,
    now: int | None = None,
) -> Token:
    """Sign one token for one repository (a key in memory, or a Signer: `LocalSigner`, hsm.py)."""
    return Template(key, org=org, repo=repo, scopes=scopes, ttl=ttl, sub=sub, kid=kid, refs=refs).mint(now)


class Template:
    """One token's claims but its times, checked and encoded once.

    An agent mints the same few tokens all day (a grant's, for the few requests a sandbox's
    helpers send), so it keeps these: checking and encoding the claims per token cost about
    as much as the rest of a token but the signature.
    """

    __slots__ = ("signer", "ttl", "_head", "_claims", "_tail")

    def __init__(
        self,
        key: PrivateKey | Signer,
        *,
        org: str,
        repo: str,
        scopes: Sequence[str],
        ttl: int,
        sub: str,
        kid: str | None = None,
        refs: Sequence[tuple[str, Sequence[str]]] | None = None,
    ) -> None:
        check_ttl(ttl, "token", TokenError)
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise TokenError(f"bad scopes {' '.join(unknown) or '(none)'}; known: {' '.join(SCOPES)}")
        self.signer = key if isinstance(key, LocalSigner) or not isinstance(key, _LOCAL) else LocalSigner(key)
        self.ttl = ttl
        self._head = _header(self.signer.algorithm, kid) + b"."
        # The claims in this order: iss, sub, repo, scopes, iat, exp[, refs]; JSON as _COMPACT writes it.
        self._claims = _COMPACT({"iss": org, "sub": sub, "repo": repo, "scopes": list(scopes)})[:-1] + ',"iat":'
        self._tail = "}"
        if refs:
            self._tail = ',"refs":' + _COMPACT([[p, list(ops)] for p, ops in ref_policy([list(r) for r in refs], TokenError)]) + "}"

    def mint(self, now: int | None = None) -> Token:
        signing_input, exp = self.signing_input(now)
        return self.signed(signing_input, self.signer.sign(signing_input), exp)

    def signing_input(self, now: int | None = None) -> tuple[bytes, int]:
        """(the JWS signing input of the token issued at `now`, its expiry): what `signer` signs."""
        iat = int(time.time()) if now is None else now
        exp = iat + self.ttl
        return self._head + _b64(f'{self._claims}{iat},"exp":{exp}{self._tail}'.encode()), exp

    @staticmethod
    def signed(signing_input: bytes, signature: bytes, exp: int) -> Token:
        return Token((signing_input + b"." + _b64(signature)).decode("ascii"), exp)


_LOCAL = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
_HEADERS: dict[tuple[str, str | None], bytes] = {}  # (alg, kid) -> the encoded JWS header: a handful per process


def _header(alg: str, kid: str | None) -> bytes:
    encoded = _HEADERS.get((alg, kid))
    if encoded is None:
        encoded = _HEADERS[(alg, kid)] = _b64json({"alg": alg, "typ": "JWT", "kid": kid} if kid else {"alg": alg, "typ": "JWT"})
    return encoded


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> bytes:
    """base64url without padding (RFC 7515): base64.urlsafe_b64encode's work, in one call less a token."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


_COMPACT = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps with options builds an encoder per call


def _b64json(obj: Mapping[str, object]) -> bytes:
    return _b64(_COMPACT(obj).encode("utf-8"))


class LocalSigner:
    """A key in memory as a Signer: its algorithm decided once (not per token, as a long-running
    agent would otherwise pay on every mint), the JWS signature shape of RFC 7518."""

    __slots__ = ("key", "algorithm", "sign")

    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self.algorithm = algorithm_for(key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            ecdsa = ec.ECDSA(hashes.SHA256())

            def sign(data: bytes) -> bytes:
                # ES256 is raw r||s, not the DER that OpenSSL returns.
                r, s = decode_dss_signature(key.sign(data, ecdsa))
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        elif isinstance(key, rsa.RSAPrivateKey):
            pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

            def sign(data: bytes) -> bytes:
                return key.sign(data, pkcs1, sha256)
        else:
            sign = key.sign
        self.sign = sign


class Claims(record("Claims", "iss sub repo scopes iat exp refs kid")):
    """A verified token's claims (and its `kid`)."""

    __slots__ = ()
    iss: str
    sub: str
    repo: str
    scopes: tuple[str, ...]
    iat: int
    exp: int
    refs: RefPolicy
    kid: str | None

    def has(self, scope: str) -> bool:
        return allows(self.scopes, scope)


def unverified_header(token: str) -> Mapping[str, object]:
    """The header, unchecked; refused if it lists critical extensions (RFC 7515's `crit`: a
    recipient must refuse what it does not implement, and Code Storage's tokens use none)."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        # PyJWT refuses an unknown `crit` here too; say that rather than "not a JWT".
        _refuse_critical(_peek_header(token))
        raise TokenError("malformed token: not a JWT") from None
    _refuse_critical(header)
    return header


def _peek_header(token: str) -> Mapping[str, object]:
    """The header's JSON, decoded only to explain a refusal (never to trust anything)."""
    from . import jsontext

    part = token.split(".", 1)[0]
    try:
        header = jsontext.loads(jsontext.segment(part))
    except ValueError:
        return {}
    return header if isinstance(header, dict) else {}


def _refuse_critical(header: Mapping[str, object]) -> None:
    if "crit" in header:
        names = header["crit"] if isinstance(header["crit"], list) else [header["crit"]]
        shown = ", ".join(repr(str(name)[:40]) for name in names[:5]) or "none"
        raise TokenError(f"token header marks extensions critical (crit: {shown}), which this server does not implement; "
                         "mint it without crit")


def unverified_parts(token: Token) -> tuple[dict[str, object], dict[str, object]]:
    """The header and claims of a token we hold (for showing them; never for trusting them)."""
    import jwt

    raw = token.reveal()
    try:
        return dict(jwt.get_unverified_header(raw)), dict(jwt.decode(raw, options={"verify_signature": False}))
    except jwt.PyJWTError:
        raise TokenError("malformed token: not a JWT") from None


def verify(
    token: str,
    keys: Mapping[str, PublicKey],
    *,
    org: str,
    now: int | None = None,
) -> Claims:
    """Check signature (by `kid`, or the only key), algorithm, `iss`, `exp`/`iat`.

    Scope and repository checks are the caller's: they depend on the request.
    Messages say why without echoing the token.
    """
    import jwt

    header = unverified_header(token)
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenError(f"algorithm {alg!r} is not accepted; use one of {', '.join(ALLOWED_ALGORITHMS)}")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("kid must be a string")
    if kid is not None:
        # "<file>" labels a key trusted without a kid (the dev server's): it verifies tokens
        # without one, never a token whose kid spells the label.
        if kid not in keys or (kid.startswith("<") and kid.endswith(">")):
            raise TokenError(f"unknown kid {kid!r}: register its public key with the server")
        key = keys[kid]
    elif len(keys) == 1:
        key = next(iter(keys.values()))
    else:
        raise TokenError("token has no kid and the server trusts several keys; set CODESTORE_KID")
    if algorithm_for(key) != alg:
        raise TokenError(f"algorithm {alg} does not match the registered key for kid {kid!r}")
    now = int(time.time()) if now is None else now
    try:
        raw = jwt.decode(
            token,
            key,
            algorithms=[alg],
            # `repo` is optional: org-wide tokens (`org:read`, as Code Storage's docs allow
            # and the SDK mints for listing) need none; every repository check then fails.
            # exp, iat and nbf with LEEWAY, and aud, checked below, each with its own message.
            options={"require": ["iss", "scopes", "iat", "exp"], "verify_exp": False, "verify_iat": False,
                     "verify_nbf": False, "verify_aud": False},
        )
    except jwt.InvalidSignatureError:
        raise TokenError("signature does not verify: token signed by an unregistered key") from None
    except jwt.MissingRequiredClaimError as e:
        raise TokenError(f"token lacks the {e.claim!r} claim") from None
    except jwt.PyJWTError as e:
        raise TokenError(f"malformed token ({type(e).__name__})") from None
    if raw["iss"] != org:
        raise TokenError(f"token issuer {raw['iss']!r} is not this org {org!r}")
    exp, iat = raw["exp"], raw["iat"]
    if not isinstance(exp, int) or not isinstance(iat, int):
        raise TokenError("iat and exp must be integers")
    if exp + LEEWAY < now:
        raise TokenError(f"token expired {now - exp}s ago; mint a new one")
    if iat - LEEWAY > now:
        raise TokenError(f"token issued {iat - now}s in the future; check the clock")
    nbf = raw.get("nbf", iat)
    if not isinstance(nbf, int):
        raise TokenError("nbf must be an integer")
    if nbf - LEEWAY > now:
        raise TokenError(f"token not valid for another {nbf - now}s (nbf); check the clock")
    if "aud" in raw:
        # RFC 7519: a recipient that is not in `aud` must refuse the token.
        raise TokenError(f"token is meant for audience {str(raw['aud'])[:100]!r}, which this server is not; mint it without aud")
    scopes = raw["scopes"]
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise TokenError("scopes must be a list of strings")
    repo = raw.get("repo", "")
    if not isinstance(repo, str):
        raise TokenError("repo must be a string")
    refs = ref_policy(raw["refs"], TokenError) if raw.get("refs") is not None else []
    if raw.get("ops") is not None:
        # The deprecated top-level `ops` claim: a catch-all rule, after any `refs` rules.
        refs += legacy_ops_rule(raw["ops"], TokenError)
    return Claims(
        iss=raw["iss"],
        sub=str(raw.get("sub", "")),
        repo=repo,
        scopes=tuple(scopes),
        iat=iat,
        exp=exp,
        refs=refs,
        kid=kid,
    )
