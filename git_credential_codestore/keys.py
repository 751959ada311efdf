"""Key custody: where the org's private key lives, and how to make or show one.

Sources, in priority order (the first that has a key wins):

1. `CODESTORE_PRIVATE_KEY`: PEM text in the environment (trusted servers, CI).
2. `CODESTORE_PRIVATE_KEY_FILE`, or `private_key_file` in the config file.
3. The OS keychain through `keyring` (service "codestore", account = org).
4. A 0600 file under the user data dir, used where no keychain backend works
   (headless Linux); `codestore key generate` says when it falls back to it.

Private keys never travel in argv: `key import` reads a file or stdin.
"""

from __future__ import annotations

import base64
import os
import stat
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .config import Config, env_name, getenv
from .errors import InvalidKey, KeyNotFound, TokenError
from .secrets import Secret
from .tokens import PrivateKey, PublicKey, algorithm_for

KEYRING_SERVICE = "codestore"
KEY_KINDS = ("ec", "rsa", "ed25519")


TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Protocol

    class KeySource(Protocol):
        """One place a private key may be kept."""

        name: str

        def read(self) -> Secret | None: ...


# Plain classes, not dataclasses: this module is on the local-key signing path of every
# git request, and each dataclass costs a fraction of a millisecond to build at import.
class EnvSource:
    def __init__(self, env: Mapping[str, str], name: str = "CODESTORE_PRIVATE_KEY") -> None:
        self.env = env
        self.name = name

    def read(self) -> Secret | None:
        value = getenv(self.env, "CODESTORE_PRIVATE_KEY")
        return Secret(value) if value.strip() else None


class FileSource:
    def __init__(self, path: str, name: str = "") -> None:
        self.path = path
        self.name = name or path

    def read(self) -> Secret | None:
        from .files import read_bounded

        try:
            return Secret(read_bounded(self.path, "the key file").decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise KeyNotFound(f"cannot read the key file {self.path}: {getattr(e, 'strerror', e)}") from None


class KeyringSource:
    def __init__(self, account: str, name: str = "the OS keychain", env: Mapping[str, str] | None = None) -> None:
        self.account = account
        self.name = name
        self.env = os.environ if env is None else env

    def read(self) -> Secret | None:
        # keyring's import is ~55 ms even where no keychain works; where one did not work
        # last time, in the same environment, it still does not, and asking it would
        # find nothing: the documented order (keychain, then the key file) is unchanged.
        if _keychain_known_unusable(self.env):
            return None
        import keyring
        from keyring.errors import KeyringError

        if not keychain_usable():
            _remember_keychain_unusable(self.env)
            return None
        try:
            value = keyring.get_password(KEYRING_SERVICE, self.account)
        except (KeyringError, RuntimeError):
            return None
        return Secret(value) if value else None

    def write(self, pem: Secret) -> bool:
        """Store the key; False when no working keychain backend exists here."""
        import keyring
        from keyring.errors import KeyringError

        if not keychain_usable():
            return False
        try:
            keyring.set_password(KEYRING_SERVICE, self.account, pem.reveal())
        except (KeyringError, RuntimeError):
            return False
        from .config_cache import store

        path, key = _keychain_verdict(self.env)
        store(path, key, "usable")  # a keychain that works now is asked again
        return True


def _keychain_verdict(env: Mapping[str, str]) -> tuple[str, object]:
    """Where the verdict is kept, and what keyring's choice of backend depends on here."""
    from .config import user_dir

    home = env.get("HOME") or os.path.expanduser("~")
    rc = os.path.join(env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
                      "python_keyring", "keyringrc.cfg")
    try:
        rc_st = os.stat(rc)
        rc_id: object = (rc_st.st_ino, rc_st.st_size, rc_st.st_mtime_ns)
    except OSError:
        rc_id = None
    key = (1, sys.platform, sys.prefix, os.getuid() if hasattr(os, "getuid") else 0,
           env.get("PYTHON_KEYRING_BACKEND", ""), env.get("DBUS_SESSION_BUS_ADDRESS", ""), rc_id)
    return os.path.join(user_dir("cache", env), "keychain.marshal"), key


def _keychain_known_unusable(env: Mapping[str, str]) -> bool:
    from .config_cache import load

    path, key = _keychain_verdict(env)
    return load(path, key) == "unusable"


def _remember_keychain_unusable(env: Mapping[str, str]) -> None:
    from .config_cache import store

    path, key = _keychain_verdict(env)
    store(path, key, "unusable")


def keychain_usable() -> bool:
    import keyring
    from keyring.backends import fail, null

    backend = keyring.get_keyring()
    if isinstance(backend, (fail.Keyring, null.Keyring)):
        return False
    chained = getattr(backend, "backends", None)
    return chained is None or bool(chained)


def fallback_key_path(account: str, env: Mapping[str, str] | None = None) -> str:
    from .config import user_dir

    return os.path.join(user_dir("data", env), "keys", f"{account}.pem")


def account_for(cfg: Config) -> str:
    """The keychain account and key file name of cfg's org: its name folded to lower case.
    An org's name is a DNS label, so ACME and acme are one org, and have one key."""
    return (cfg.org or "default").lower()


def _accounts(cfg: Config) -> list[str]:
    """account_for's, then the org as written when that differs: where a key stored before
    names were folded still is (read and removed, never written)."""
    account = account_for(cfg)
    return [account] if not cfg.org or cfg.org == account else [account, cfg.org]


def sources(cfg: Config, env: Mapping[str, str] | None = None) -> list[KeySource]:
    env = os.environ if env is None else env
    if not cfg.uses_env:
        env = {}  # an [orgs.*] section: the environment's key is another org's
    out: list[KeySource] = [EnvSource(env, env_name(env, "CODESTORE_PRIVATE_KEY"))]
    path = getenv(env, "CODESTORE_PRIVATE_KEY_FILE") or cfg.private_key_file
    if path:
        # An explicitly named file is the only file source: falling through to the
        # keychain when it is missing would sign with a key the user did not choose.
        out.append(FileSource(os.path.expanduser(path)))
        return out
    for account in _accounts(cfg):
        out.append(KeyringSource(account, env=env))
        out.append(FileSource(fallback_key_path(account, env), name="the codestore key file"))
    return out


def parse_private_key(pem: Secret, where: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.reveal().encode("utf-8"), password=None)
    except (ValueError, TypeError):
        # The library's message may quote the input: say only where it came from.
        raise KeyNotFound(
            f"the key from {where} is not an unencrypted PEM private key; "
            "re-import it with: codestore key import FILE"
        ) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise InvalidKey(f"the key from {where} is a {type(key).__name__}; use EC P-256, RSA or Ed25519")
    try:
        algorithm_for(key)
    except TokenError as e:
        raise InvalidKey(f"the key from {where}: {e}") from None
    return key


def load_private_key(cfg: Config, env: Mapping[str, str] | None = None) -> tuple[PrivateKey, str]:
    """The first key found and a description of where it came from."""
    chain = sources(cfg, env)
    for source in chain:
        pem = source.read()
        if pem is not None:
            return parse_private_key(pem, source.name), source.name
    if isinstance(chain[-1], FileSource) and len(chain) == 2:
        raise KeyNotFound(f"the key file {chain[-1].path} does not exist; fix CODESTORE_PRIVATE_KEY_FILE")
    raise KeyNotFound(
        "no private key found (CODESTORE_PRIVATE_KEY, CODESTORE_PRIVATE_KEY_FILE, keychain) and no agent; "
        "run: codestore key generate (or codestore key import FILE), or set CODESTORE_GRANT for an agent"
    )


def generate(kind: str = "ec") -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise InvalidKey(f"unknown key type {kind!r}; choose one of {', '.join(KEY_KINDS)}")


def private_pem(key: PrivateKey) -> Secret:
    return Secret(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
    )


def store_private_key(key: PrivateKey, cfg: Config) -> str:
    """Keep the key in the keychain, or in a 0600 file where there is none. Returns where."""
    pem = private_pem(key)
    account = account_for(cfg)
    if KeyringSource(account).write(pem):
        # An older fallback file would shadow nothing, but would leave a second copy.
        try:
            os.unlink(fallback_key_path(account))
        except FileNotFoundError:
            pass
        return "the OS keychain"
    path = fallback_key_path(account)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    from .files import write_atomic

    return write_atomic(path, pem.reveal(), 0o600)


def delete_stored_key(cfg: Config) -> list[str]:
    removed = []
    for account in _accounts(cfg):
        try:
            import keyring

            if keychain_usable() and keyring.get_password(KEYRING_SERVICE, account):
                keyring.delete_password(KEYRING_SERVICE, account)
                removed.append("the OS keychain")
        except Exception:  # noqa: BLE001 - a broken keychain must not block removal of the file
            pass
        path = fallback_key_path(account)
        if os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    return removed


def file_is_private(path: str) -> bool:
    mode = os.stat(path).st_mode
    return not mode & (stat.S_IRWXG | stat.S_IRWXO)


def public_pem(key: PrivateKey | PublicKey) -> str:
    pub = key.public_key() if hasattr(key, "private_bytes") else key  # type: ignore[union-attr]
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: bytes, where: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        # A private key file is accepted too: its public half is what we need.
        try:
            priv = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise KeyNotFound(f"{where} holds no PEM public key") from None
        key = priv.public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        raise InvalidKey(f"{where}: unsupported key type {type(key).__name__}")
    algorithm_for(key)
    return key


def _b64(n: bytes) -> str:
    return base64.urlsafe_b64encode(n).rstrip(b"=").decode("ascii")


def public_jwk(key: PrivateKey | PublicKey, kid: str | None = None) -> dict[str, str]:
    pub = key.public_key() if hasattr(key, "private_bytes") else key  # type: ignore[union-attr]
    jwk: dict[str, str]
    if isinstance(pub, ec.EllipticCurvePublicKey):
        ec_nums = pub.public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64(ec_nums.x.to_bytes(32, "big")),
               "y": _b64(ec_nums.y.to_bytes(32, "big"))}
    elif isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        jwk = {
            "kty": "RSA",
            "n": _b64(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
            "e": _b64(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")),
        }
    else:
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
    jwk["alg"] = algorithm_for(pub)
    jwk["use"] = "sig"
    if kid:
        jwk["kid"] = kid
    return jwk
