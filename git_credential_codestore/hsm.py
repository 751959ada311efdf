"""Signing through a PKCS#11 token: the org key stays in the token, never in our memory.

`--key pkcs11:token=codestore;object=org-key?module-path=/usr/lib/softhsm/libsofthsm2.so`
(an RFC 7512 URI). The module comes from the URI's `module-path` or
CODESTORE_PKCS11_MODULE; the user PIN from the URI's `pin-source` (a file) or
CODESTORE_PKCS11_PIN, never from `pin-value`: a URI lands in argv and in process
listings, where a PIN must not.

Only the signature crosses the boundary: ES256 (EC P-256 keys, CKM_ECDSA over our own
SHA-256 digest, whose r||s output is already JWS's format) and RS256 (RSA >= 2048 bits,
CKM_SHA256_RSA_PKCS). Keys made by `codestore key generate --pkcs11` are sensitive and
non-extractable.

The same seam (`tokens.Signer`: `algorithm` and `sign(data)`) is where a cloud KMS
plugs in: AWS KMS `Sign` with ECDSA_SHA_256 (DER, converted to r||s) or
RSASSA_PKCS1_V1_5_SHA_256, GCP KMS `asymmetricSign` over the SHA-256 digest, Azure Key
Vault `sign` with ES256/RS256. Each returns a signature for a digest and keeps the key.

python-pkcs11 (the fleet extra) rather than PyKCS11: a typed, Pythonic API over the same
C interface, with helpers for EC parameters and public-key encodings that we would
otherwise write by hand, and wheels for the platforms we run on.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .errors import ConfigError, UsageError
from .files import not_a_file, read_bounded
from .tokens import PublicKey, SignerUnavailable

if TYPE_CHECKING:  # python-pkcs11 is the fleet extra: imported where used, after open_token's check
    from pkcs11 import PrivateKey as TokenPrivateKey
    from pkcs11 import Session, SignMixin

MODULE_ENV = "CODESTORE_PKCS11_MODULE"
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # DER of the OID secp256r1: the curve ES256 needs
PIN_ENV = "CODESTORE_PKCS11_PIN"


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI we use (path: token, object, id, type; query: module-path, pin-source)."""

    token: str | None
    object: str | None
    id: bytes | None
    module: str
    pin_source: str | None

    def __str__(self) -> str:  # no query: that is where a module path and PIN file live
        parts = [f"token={self.token}" if self.token else "", f"object={self.object}" if self.object else ""]
        return "pkcs11:" + ";".join(p for p in parts if p)


# The attributes read (RFC 7512's path and query parts). Any other is refused, not ignored:
# a misspelt `token=` matched the first token found, and `?pin=1234` went unnoticed in argv.
_PATH_ATTRS = frozenset({"token", "object", "id", "type"})
_QUERY_ATTRS = frozenset({"module-path", "pin-source", "pin-value"})


def parse_uri(uri: str, env: Mapping[str, str]) -> Pkcs11Uri:
    """The URI's parts; UsageError in one line otherwise, which quotes no value (one may be a
    PIN typed in the wrong place) and an attribute's name only when it is one."""
    if not uri.startswith("pkcs11:"):
        raise UsageError("a PKCS#11 key is a pkcs11: URI (RFC 7512), e.g. pkcs11:token=codestore;object=org-key")
    path, _, query = uri[len("pkcs11:"):].partition("?")
    attrs: dict[str, str] = {}
    for part, sep, known in ((path, ";", _PATH_ATTRS), (query, "&", _QUERY_ATTRS)):
        where = "before ?" if sep == ";" else "after ?"
        for item in filter(None, part.split(sep)):
            k, eq, v = item.partition("=")
            name = k.strip().lower()
            if not eq:
                raise UsageError(f"the key URI has an attribute without '=' {where}; each is name=value, separated by {sep!r}")
            if name not in known:
                shown = f"{name!r} " if len(name) <= 20 and name.replace("-", "").isalpha() else ""
                raise UsageError(f"the key URI's attribute {shown}{where} is not one codestore reads there: "
                                 f"it takes {', '.join(sorted(known - {'pin-value'}))}")
            attrs[name] = unquote(v)
    if "pin-value" in attrs:
        raise UsageError("a PIN in the key URI would show in process listings; use pin-source=FILE or set CODESTORE_PKCS11_PIN")
    if attrs.get("type", "private") != "private":
        raise UsageError("the key URI must name a private key (type=private)")
    module = attrs.get("module-path") or env.get(MODULE_ENV, "")
    if not module:
        raise UsageError(f"no PKCS#11 module: add module-path=... to the URI or set {MODULE_ENV} (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
    if not attrs.get("object") and "id" not in attrs:
        raise UsageError("the key URI must name the key: object=LABEL or id=%01...")
    return Pkcs11Uri(attrs.get("token"), attrs.get("object"), unquote_bytes(attrs["id"]) if "id" in attrs else None,
                     module, attrs.get("pin-source"))


def unquote_bytes(text: str) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(text)


def _pin(uri: Pkcs11Uri, env: Mapping[str, str]) -> str | None:
    if uri.pin_source:
        path = uri.pin_source.removeprefix("file:")
        try:
            # Bounded, and a pipe is read only while its writer writes (files.read_bounded).
            pin = read_bounded(path, "the PKCS#11 PIN file (pin-source)", 4096).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            # The path is not quoted: a PIN put in its place (pin-source=1234) would be.
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the PKCS#11 PIN file that pin-source names ({why}); "
                              "pin-source is the path of a file holding the PIN, not the PIN") from None
        if not pin:  # a named pipe with no writer reads as empty too
            raise ConfigError("the PKCS#11 PIN file that pin-source names is empty; fix pin-source")
        return pin
    return env.get(PIN_ENV) or None


def _require_pkcs11() -> None:
    """The entry points call this first, so a missing extra is one line naming the install."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise ConfigError("--key pkcs11:... needs python-pkcs11: pip install 'codestore-git[fleet]'") from None


def open_token(uri: Pkcs11Uri, env: Mapping[str, str], rw: bool = False) -> Session:
    """A logged-in session on the URI's token."""
    _require_pkcs11()
    import pkcs11

    if not_a_file(uri.module):  # the loader (dlopen) opens a named pipe and waits for a writer for ever
        raise ConfigError(f"the PKCS#11 module {uri.module} is not a regular file; check module-path or {MODULE_ENV}")
    try:
        lib = pkcs11.lib(uri.module)
    except Exception as e:  # noqa: BLE001 - the module's loader raises several kinds
        raise ConfigError(f"cannot load the PKCS#11 module {uri.module} ({type(e).__name__}); check module-path or {MODULE_ENV}") from None
    try:
        token = lib.get_token(token_label=uri.token) if uri.token else next(iter(lib.get_slots(token_present=True))).get_token()
    except Exception as e:  # noqa: BLE001 - NoSuchToken, MultipleTokensReturned, StopIteration
        raise ConfigError(f"no PKCS#11 token {uri.token or '(any)'} in {uri.module} ({type(e).__name__}); check token= in the URI") from None
    pin = _pin(uri, env)
    if pin is None:  # a session without a login sees no private key: "no such key" named the wrong fault
        raise ConfigError(f"no PIN for the PKCS#11 token {uri.token or '(any)'}: set {PIN_ENV}, or add pin-source=FILE to the key URI")
    try:
        return token.open(user_pin=pin, rw=rw)
    except pkcs11.exceptions.PinIncorrect:
        raise ConfigError(f"the PKCS#11 PIN for token {uri.token} is wrong; fix {PIN_ENV} or pin-source") from None
    except pkcs11.exceptions.PKCS11Error as e:
        raise ConfigError(f"cannot open PKCS#11 token {uri.token} ({type(e).__name__})") from None


REOPEN_WINDOW = 3.0  # seconds a forked worker keeps trying to open the token the parent opened
# Seconds a signature waits for the token while another is in the token. A network HSM that
# stops answering without closing the connection (a paused server, a partition) holds the
# call in progress forever, and PKCS#11 cannot cancel it: past this, every other signature
# is refused at once (and /readyz says so), instead of each handler thread waiting behind it.
SIGN_WAIT = 2.0


class Pkcs11Signer:
    """A `tokens.Signer` backed by a private key in a PKCS#11 token."""

    def __init__(self, uri: str, env: Mapping[str, str]) -> None:
        self.uri = parse_uri(uri, env)
        self.env = dict(env)
        self._lock = threading.Lock()  # one session; PKCS#11 sessions are not for concurrent use
        self._since: float | None = None  # when the signature in the token began (see SIGN_WAIT)
        self._session: Session | None = None
        self._key: SignMixin | None = None
        self.algorithm = ""
        self._last_error = ""
        self._connect()

    def __repr__(self) -> str:
        return f"Pkcs11Signer({str(self.uri)!r})"

    def _connect(self) -> SignMixin:
        session = open_token(self.uri, self.env)
        import pkcs11

        found = private_keys(session, self.uri.object, self.uri.id)
        if len(found) != 1:
            session.close()
            raise ConfigError(f"{self.uri}: {'no such key' if not found else 'several keys match'}; "
                              "check object=/id= (codestore key generate --pkcs11 URI makes one)")
        key = found[0]
        try:
            if key.key_type == pkcs11.KeyType.EC:
                if key[pkcs11.Attribute.EC_PARAMS] != P256_PARAMS:
                    raise ConfigError(f"{self.uri} is an EC key on another curve; ES256 needs P-256")
                self.algorithm = "ES256"
            elif key.key_type == pkcs11.KeyType.RSA:
                bits = len(key[pkcs11.Attribute.MODULUS]) * 8
                if bits < 2048:  # as a local key is refused (keys.py): a token is no excuse for a weak key
                    raise ConfigError(f"{self.uri} is an RSA key of {bits} bits; RSA keys must be at least 2048 bits")
                self.algorithm = "RS256"
            else:
                raise ConfigError(f"{self.uri} is a {key.key_type.name} key; use EC P-256 or RSA")
        except BaseException:
            session.close()
            raise
        if not isinstance(key, pkcs11.SignMixin):  # the object's CKA_SIGN is false
            session.close()
            raise ConfigError(f"{self.uri} may not sign (CKA_SIGN is false); make one with codestore key generate --pkcs11 URI")
        self._session, self._key = session, key
        return key

    def sign(self, data: bytes) -> bytes:
        import pkcs11

        since = self._since
        stuck = since is not None and time.monotonic() - since > SIGN_WAIT
        if not self._lock.acquire(timeout=0 if stuck else SIGN_WAIT):
            since = self._since
            waited = f"for {time.monotonic() - since:.0f} s" if since is not None else f"within {SIGN_WAIT:g} s"
            raise SignerUnavailable(f"the PKCS#11 token ({self.uri}) has not answered {waited}; nothing was signed")
        try:
            self._since = time.monotonic()
            try:
                key = self._key if self._key is not None else self._reconnect()
                if self.algorithm == "ES256":
                    sig = key.sign(hashlib.sha256(data).digest(), mechanism=pkcs11.Mechanism.ECDSA)
                else:
                    sig = key.sign(data, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS)
            except (pkcs11.exceptions.PKCS11Error, ConfigError) as e:
                self._drop()
                self._last_error = f"the PKCS#11 token ({self.uri}) failed: {type(e).__name__}"
                raise SignerUnavailable(f"{self._last_error}; nothing was signed") from None
            self._last_error = ""
            return bytes(sig)
        finally:
            self._since = None
            self._lock.release()

    def _reconnect(self) -> SignMixin:
        """After a failure: the module forgets a token that went away until it is re-initialised."""
        try:
            return self._connect()
        except ConfigError:
            import pkcs11

            pkcs11.lib(self.uri.module).reinitialize()
            return self._connect()

    def release(self) -> None:
        """Before a fork: close the session and finalize the module, so no PKCS#11 state
        crosses into the children (the standard leaves a forked child's inherited state
        undefined; each child initializes its own with `reopen`)."""
        import pkcs11

        with self._lock:
            self._drop()
            pkcs11.lib(self.uri.module).finalize()

    def reopen(self) -> None:
        """In a forked child: its own initialization of the module, session and key.

        Tried again for up to REOPEN_WINDOW: with several workers initializing at once, a
        token can be missing from a module's list for a moment (seen once in CI: SoftHSM2
        through p11-kit, NoSuchToken in one of two workers, while the parent had found it)."""
        deadline = time.monotonic() + REOPEN_WINDOW
        with self._lock:
            while True:
                try:
                    self._reconnect()  # pkcs11.lib() initializes a finalized module again
                    return
                except ConfigError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.05)

    def _drop(self) -> None:
        try:
            if self._session is not None:
                self._session.close()
        except Exception:  # noqa: BLE001, S110 - the token is already gone
            pass
        self._session = self._key = None

    def health(self) -> tuple[bool, str]:
        """Sign a probe: the only check that proves the key is usable."""
        try:
            self.sign(b"codestore readiness probe")
        except SignerUnavailable as e:
            return False, str(e)
        return True, "ok"


def private_keys(session: Session, label: str | None, kid: bytes | None) -> list[TokenPrivateKey]:
    """The token's private keys with this label and id (None: any), two at most."""
    import pkcs11

    return [key for key in _objects(session, pkcs11.ObjectClass.PRIVATE_KEY, label, kid) if isinstance(key, pkcs11.PrivateKey)]


def _objects(session: Session, kind: object, label: str | None, kid: bytes | None) -> list[object]:
    """The token's objects of class `kind` with this label and id (None: any), two at most.

    Not `Session.get_key`: on "several match" it left its search open, and the search's
    end then ran after the session's close, printing a traceback ("Exception ignored in
    ... get_objects ... SessionHandleInvalid") under the one-line error."""
    import itertools

    import pkcs11

    attrs: dict[object, object] = {pkcs11.Attribute.CLASS: kind}
    if label is not None:
        attrs[pkcs11.Attribute.LABEL] = label
    if kid is not None:
        attrs[pkcs11.Attribute.ID] = kid
    search = session.get_objects(attrs)  # type: ignore[arg-type]
    try:
        return list(itertools.islice(search, 2))
    finally:
        search.close()  # type: ignore[attr-defined]  # a generator: its search ends here, in this session


def public_key_of(session: Session, private: TokenPrivateKey) -> PublicKey:
    """The cryptography public key matching a token's private key (from its public object)."""
    import pkcs11
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    found = _objects(session, pkcs11.ObjectClass.PUBLIC_KEY, private.label, private.id)
    pub = found[0] if len(found) == 1 else None
    if not isinstance(pub, pkcs11.PublicKey):
        raise ConfigError(f"the token holds {'no' if not found else 'more than one'} public key for {private.label!r}; "
                          "choose another object=")
    if pub.key_type == pkcs11.KeyType.EC:
        from pkcs11.util.ec import encode_ec_public_key

        der = encode_ec_public_key(pub)
    else:
        from pkcs11.util.rsa import encode_rsa_public_key

        der = encode_rsa_public_key(pub)
    key = load_der_public_key(der)
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ConfigError(f"the token's key {private.label!r} is a {type(key).__name__}; use EC P-256 or RSA")
    return key


def generate(uri_text: str, kind: str, env: Mapping[str, str]) -> PublicKey:
    """Make a non-extractable key pair in the token; returns the public key."""
    uri = parse_uri(uri_text, env)
    session = open_token(uri, env, rw=True)
    import pkcs11

    try:
        # A key of this label whatever its id, or of this id whatever its label: a second key of
        # the label made `object=LABEL`, what the agent was started with, match two keys, and
        # the agent refused to start.
        if uri.object is not None and private_keys(session, uri.object, None):
            raise ConfigError(f"the token already holds a key with object={uri.object}; choose another (keys are never overwritten)")
        if uri.id is not None and private_keys(session, None, uri.id):
            raise ConfigError("the token already holds a key with that id=; choose another (keys are never overwritten)")
        private = {pkcs11.Attribute.SENSITIVE: True, pkcs11.Attribute.EXTRACTABLE: False}
        label, kid = uri.object or "codestore", uri.id or os.urandom(8)
        if kind == "ec":
            from pkcs11.util.ec import encode_named_curve_parameters

            params = session.create_domain_parameters(
                pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
            pub, priv = params.generate_keypair(store=True, label=label, id=kid, private_template=private)
        elif kind == "rsa":
            pub, priv = session.generate_keypair(pkcs11.KeyType.RSA, 2048, store=True, label=label, id=kid, private_template=private)
        else:
            raise UsageError(f"a PKCS#11 key is ec or rsa, not {kind}")
        return public_key_of(session, priv)
    finally:
        session.close()
