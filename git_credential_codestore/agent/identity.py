"""Verifying a workload's identity token (OIDC): the issuer's keys, the signature, the claims.

The agent trusts an issuer only when a trust policy names it, and fetches nothing else:
the token's own `iss` merely selects among the issuers the owner configured, and keys
named by the token's header (`jku`, `x5u`, `jwk`, `x5c`) are refused outright, so a
forger cannot point the agent at keys of its choosing. Keys come from the issuer's
OIDC discovery document, then its JWKS, both over HTTPS only (a CA bundle may replace
the system's), with a timeout, no redirects and a size cap.

Key cache, per issuer:
    fresh for KEYS_FRESH seconds; then refetched on the next request;
    an issuer that is down does not stop tokens whose keys are cached: stale keys keep
    working for KEYS_STALE_GRACE seconds (a failed fetch is retried after
    REFETCH_INTERVAL, not on every request);
    a `kid` not in the cache forces one refetch, at most once per REFETCH_INTERVAL
    (forged kids cannot make the agent hammer the issuer); still unknown -> refused.

Signature and registered claims are checked by PyJWT (`jwt.decode` with exactly one
asymmetric algorithm: the one the token declares, which must be one we accept and
match the key). No HMAC: a JWKS is public, so an HS256 token "keyed with the JWKS"
would verify for anyone. `exp` and `iat` are required; `nbf` is checked when present;
LEEWAY seconds of clock skew are allowed.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from .. import jsontext
from ..errors import Refused
from ..files import ca_context

# Asymmetric only. HS* would let anyone holding the (public) JWKS sign; "none" signs nothing.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# Header parameters that name or carry a key: the token must not choose its own key.
HEADER_KEYS = ("jku", "x5u", "jwk", "x5c")
LEEWAY = 30
KEYS_FRESH = 300.0
KEYS_STALE_GRACE = 24 * 3600.0
REFETCH_INTERVAL = 30.0
FETCH_TIMEOUT = 4.0
MAX_DOCUMENT = 256 * 1024


class KeyFetchError(Exception):
    """The issuer's discovery document or JWKS could not be had; the text says why (no secrets)."""


@dataclass(frozen=True)
class Identity:
    """A verified identity token's claims (the token itself is not kept)."""

    issuer: str
    claims: Mapping[str, object]
    expires_at: int
    lifetime: int  # exp - iat: how long the issuer let this token live

    @property
    def subject(self) -> str:
        sub = self.claims.get("sub")
        return printable(sub, 300) if isinstance(sub, str) else "?"


def printable(value: str, limit: int = 120) -> str:
    """Text from a token, safe to show in a refusal or an audit line."""
    text = "".join(c if c.isprintable() else "?" for c in value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a redirect is an error: keys come from the URL the issuer named


def https_fetcher(cafile: str | None = None, timeout: float = FETCH_TIMEOUT) -> Callable[[str], dict[str, object]]:
    """GET a JSON object over HTTPS, verified against `cafile` (else the system's CAs)."""
    from ..errors import ConfigError

    try:
        context = ca_context(cafile, "CODESTORE_OIDC_CA_FILE")
    except (OSError, UnicodeDecodeError, ValueError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the OIDC CA bundle {cafile} ({type(e).__name__}); fix CODESTORE_OIDC_CA_FILE") from None
    opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=context))

    def fetch(url: str) -> dict[str, object]:
        if not url.startswith("https://"):
            raise KeyFetchError(f"{printable(url, 80)} is not an https:// URL")
        try:
            with opener.open(urllib.request.Request(url, headers={"Accept": "application/json"}), timeout=timeout) as r:
                body = r.read(MAX_DOCUMENT + 1)
        except urllib.error.HTTPError as e:
            e.close()
            raise KeyFetchError(f"{printable(url, 80)} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise KeyFetchError(f"{printable(url, 80)} is unreachable ({type(reason).__name__})") from None
        if len(body) > MAX_DOCUMENT:
            raise KeyFetchError(f"{printable(url, 80)} sent more than {MAX_DOCUMENT} bytes")
        try:
            doc = jsontext.loads(body)
        except ValueError:
            raise KeyFetchError(f"{printable(url, 80)} did not send JSON") from None
        if not isinstance(doc, dict):
            raise KeyFetchError(f"{printable(url, 80)} did not send a JSON object")
        return doc

    return fetch


class IssuerKeys:
    """One issuer's signing keys: discovery, then JWKS; cached as the module docstring says."""

    def __init__(self, issuer: str, fetch: Callable[[str], dict[str, object]], *, fresh: float = KEYS_FRESH,
                 stale_grace: float = KEYS_STALE_GRACE, refetch_interval: float = REFETCH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._fresh, self._grace, self._interval, self._clock = fresh, stale_grace, refetch_interval, clock
        self._lock = threading.Lock()
        self._keys: list[PyJWK] = []
        self._fetched_at: float | None = None
        self._retry_at = float("-inf")  # after a failed fetch, not before this
        self._forced_at = float("-inf")  # the last refetch an unknown kid caused

    def _refresh(self) -> None:
        """Fetch discovery then JWKS; replaces the cache only on success (caller holds the lock)."""
        discovery = self._fetch(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if discovery.get("issuer") != self.issuer:
            raise KeyFetchError("its discovery document names another issuer")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeyFetchError("its discovery document has no jwks_uri")
        doc = self._fetch(jwks_uri)
        try:
            keyset = PyJWKSet.from_dict(doc)
        except jwt.PyJWTError:
            raise KeyFetchError("its JWKS holds no usable key") from None
        # Public signing keys only: not a JWK marked for encryption, never a symmetric one.
        self._keys = [k for k in keyset.keys if k.public_key_use in (None, "sig") and k.key_type != "oct"]
        self._fetched_at = self._clock()

    def _try_refresh(self, now: float) -> str | None:
        if now < self._retry_at:
            return "the last attempt failed moments ago"
        try:
            self._refresh()
        except KeyFetchError as e:
            self._retry_at = now + self._interval
            return str(e)
        return None

    def _find(self, kid: str | None) -> PyJWK | None:
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return next((k for k in self._keys if k.key_id == kid), None)

    def key(self, kid: str | None) -> PyJWK:
        with self._lock:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at > self._fresh:
                problem = self._try_refresh(now)
                if problem is not None and (self._fetched_at is None or now - self._fetched_at > self._grace):
                    raise Refused(503, f"cannot get the signing keys of {self.issuer}: {problem}; try again later")
            found = self._find(kid)
            if found is None and now - self._forced_at >= self._interval:
                self._forced_at = now  # rate limit: forged kids cannot make us hammer the issuer
                self._try_refresh(now)
                found = self._find(kid)
            if found is None:
                what = f"key id {printable(kid, 60)!r}" if kid is not None else "a key id (it publishes several keys)"
                raise Refused(401, f"the identity token names {what} that issuer {self.issuer} does not publish")
            return found


class Verifier:
    """Verifies identity tokens of the issuers a caller trusts; one key cache per issuer."""

    def __init__(self, fetch: Callable[[str], dict[str, object]], **cache: Any) -> None:  # IssuerKeys' settings
        self._fetch = fetch
        self._cache = cache
        self._issuers: dict[str, IssuerKeys] = {}
        self._lock = threading.Lock()

    def keys(self, issuer: str) -> IssuerKeys:
        with self._lock:
            keys = self._issuers.get(issuer)
            if keys is None:
                keys = self._issuers[issuer] = IssuerKeys(issuer, self._fetch, **self._cache)
            return keys

    def verify(self, token: str, trusted: Mapping[str, set[str]], now: float | None = None) -> Identity:
        """The verified identity, or Refused. `trusted` maps each trusted issuer to its audiences."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Refused(401, "the identity token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            shown = printable(alg, 20) if isinstance(alg, str) else repr(type(alg).__name__)
            raise Refused(401, f"identity tokens signed with {shown} are not accepted (only {', '.join(ALGORITHMS)})")
        named = [h for h in HEADER_KEYS if h in header]
        if named:
            raise Refused(401, f"the identity token names its own key ({named[0]}); keys come only from the issuer's JWKS")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Refused(401, "the identity token's kid is not a string")
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or issuer not in trusted:
            shown = printable(issuer, 80) if isinstance(issuer, str) else "no issuer"
            raise Refused(403, f"no trust policy trusts identity tokens from {shown}; see: codestore trust list")
        key = self.keys(issuer).key(kid)
        if key.algorithm_name != alg and not _same_family(key, alg):
            raise Refused(401, f"the identity token's algorithm {alg} does not match the issuer's key")
        audiences = sorted(trusted[issuer])
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], issuer=issuer, audience=audiences, leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused(401, "the identity token has expired; get a fresh one from the provider") from None
        except jwt.ImmatureSignatureError:
            raise Refused(401, "the identity token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Refused(401, f"the identity token's audience is not {' or '.join(audiences)}, which the trust policies for {issuer} expect") from None
        except jwt.MissingRequiredClaimError as e:
            raise Refused(401, f"the identity token has no {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Refused(401, f"the identity token's signature does not verify with the key {issuer} publishes") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise Refused(401, f"the identity token is invalid ({type(e).__name__})") from None
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
            raise Refused(401, "the identity token's exp and iat must be numbers")
        return Identity(issuer, claims, int(exp), int(exp) - int(iat))


def _same_family(key: PyJWK, alg: str) -> bool:
    """A JWK without `alg` gets PyJWT's default (RS256, ES256...); RSA keys also sign PS*/RS384/512."""
    declared = key._jwk_data.get("alg")  # noqa: SLF001 - PyJWK keeps the JWK it was built from
    if declared is not None:
        return bool(declared == alg)
    kty = key.key_type
    return (kty == "RSA" and alg[:2] in ("RS", "PS")) or (kty == "OKP" and alg == "EdDSA")
