"""Configuration: a small TOML file in the user's config dir, overridden by the environment.

The environment names are a contract with users and tests:

    CODESTORE_ORG               org name, the tokens' `iss`
    CODESTORE_BASE_URL          Git base URL (default https://{org}.code.storage)
    CODESTORE_API_URL           REST base URL (default https://api.{org}.code.storage)
    CODESTORE_PRIVATE_KEY       PEM text of the org's private key
    CODESTORE_PRIVATE_KEY_FILE  path to the PEM file
    CODESTORE_KID               key id put in the JWT header
    CODESTORE_TTL               token lifetime in seconds (default 300, at most vocab.MAX_TTL)
    CODESTORE_SCOPES            scopes the credential helper mints (default "git:read")
    CODESTORE_EPHEMERAL_SCOPES  scopes for the +ephemeral namespace (default: CODESTORE_SCOPES)
    CODESTORE_SUB               the `sub` claim (default codestore@<hostname>)
    CODESTORE_CONFIG            path of the TOML file itself
    CODESTORE_DEBUG             trace each credential request to stderr (never a secret)

The official `git-credential-code-storage` reads PIERRE_PRIVATE_KEY,
PIERRE_PRIVATE_KEY_FILE, PIERRE_TOKEN_TTL and PIERRE_DEBUG: each is accepted where its
CODESTORE_* name is unset (`getenv`, the one reader of these names), so an image moving
from it keeps working.

The file holds the same settings in lower case, plus per-repository rules:

    org = "acme"
    scopes = "git:read"
    [repos."team/*"]
    ephemeral_scopes = "git:read git:write"

This module is imported on every credential request, so it stays light: no crypto.
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple
from collections.abc import Mapping

from .errors import ConfigError
from .vocab import DEFAULT_TTL, EPHEMERAL_SUFFIX, check_ttl, parse_scopes, path_under, split_repo_path, split_url

# Our name -> the official helper's name for the same setting (see the module docstring).
OFFICIAL_NAMES = {
    "CODESTORE_PRIVATE_KEY": "PIERRE_PRIVATE_KEY",
    "CODESTORE_PRIVATE_KEY_FILE": "PIERRE_PRIVATE_KEY_FILE",
    "CODESTORE_TTL": "PIERRE_TOKEN_TTL",
    "CODESTORE_DEBUG": "PIERRE_DEBUG",
}


def getenv(env: Mapping[str, str], name: str) -> str:
    """The value of CODESTORE_* `name`, else of the official helper's name for it, else ""."""
    value = env.get(name, "")
    if not value.strip() and name in OFFICIAL_NAMES:
        value = env.get(OFFICIAL_NAMES[name], "")
    return value


def env_name(env: Mapping[str, str], name: str) -> str:
    """Which variable `getenv` took the value from, for messages that say what to fix."""
    return name if env.get(name, "").strip() or name not in OFFICIAL_NAMES else OFFICIAL_NAMES[name]


def debug_enabled(env: Mapping[str, str]) -> bool:
    return getenv(env, "CODESTORE_DEBUG").strip().lower() not in ("", "0", "false", "no", "off")


_XDG = {"config": ("XDG_CONFIG_HOME", ".config"), "data": ("XDG_DATA_HOME", ".local/share"),
        "state": ("XDG_STATE_HOME", ".local/state"), "cache": ("XDG_CACHE_HOME", ".cache")}


def user_dir(kind: str, env: Mapping[str, str] | None = None) -> str:
    """codestore's per-user "config", "data", "state" or "cache" directory, as seen from `env`."""
    env = os.environ if env is None else env
    if sys.platform.startswith("linux"):
        # platformdirs' own rule on Linux, without its import on every git request, and
        # from the environment given (a demo or a test runs with its own HOME).
        var, default = _XDG[kind]
        home = env.get("HOME") or os.path.expanduser("~")
        return os.path.join(env.get(var, "").strip() or os.path.join(home, default), "codestore")
    import platformdirs

    return str(getattr(platformdirs, f"user_{kind}_dir")("codestore"))


def config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("CODESTORE_CONFIG"):
        return env["CODESTORE_CONFIG"]
    return os.path.join(user_dir("config", env), "config.toml")


class RepoRule(namedtuple("RepoRule", "pattern scopes ephemeral_scopes", defaults=(None, None))):
    __slots__ = ()
    pattern: str
    scopes: tuple[str, ...] | None
    ephemeral_scopes: tuple[str, ...] | None


class Config(
    namedtuple(
        "Config",
        "org base_url_setting api_url_setting kid ttl scopes ephemeral_scopes sub_setting private_key_file repos path",
        defaults=(None, None, None, None, DEFAULT_TTL, ("git:read",), None, None, None, (), ""),
    )
):
    """The effective settings. A collections.namedtuple: a dataclass would import
    inspect and typing.NamedTuple would import typing, costs every git request pays."""

    __slots__ = ()
    org: str | None
    base_url_setting: str | None
    api_url_setting: str | None
    kid: str | None
    ttl: int
    scopes: tuple[str, ...]
    ephemeral_scopes: tuple[str, ...] | None
    sub_setting: str | None
    private_key_file: str | None
    repos: tuple[RepoRule, ...]
    path: str

    @property
    def base_url(self) -> str:
        if self.base_url_setting:
            return self.base_url_setting.rstrip("/")
        return f"https://{self.require_org()}.code.storage"

    @property
    def api_url(self) -> str:
        if self.api_url_setting:
            return self.api_url_setting.rstrip("/")
        if self.base_url_setting:
            # A self-hosted or dev server serves git and REST from one origin.
            return self.base_url
        return f"https://api.{self.require_org()}.code.storage"

    @property
    def sub(self) -> str:
        # os.uname, not socket.gethostname: socket's import is a cost on every git request.
        return self.sub_setting or f"codestore@{os.uname().nodename}"

    def require_org(self) -> str:
        if not self.org:
            raise ConfigError(
                "no org configured; set CODESTORE_ORG or run: codestore config set org <name>"
            )
        return self.org

    def repo_url(self, repo: str, ephemeral: bool = False) -> str:
        return f"{self.base_url}/{repo}{EPHEMERAL_SUFFIX if ephemeral else ''}.git"

    def scopes_for(self, repo: str, ephemeral: bool) -> tuple[str, ...]:
        """The scopes the credential helper mints for this repository and namespace."""
        scopes, eph = self.scopes, self.ephemeral_scopes
        if self.repos:
            import fnmatch  # only with [repos] rules: it imports re
        for rule in self.repos:
            if fnmatch.fnmatchcase(repo, rule.pattern):
                scopes = rule.scopes or scopes
                eph = rule.ephemeral_scopes or eph
                break
        return (eph or scopes) if ephemeral else scopes

    def serves(self, protocol: str, host: str) -> bool:
        """True when git's (protocol, host[:port]) is our configured Git base URL."""
        if not (self.org or self.base_url_setting):
            return False
        parts = split_url(self.base_url)
        return protocol == parts.scheme and host.lower() == parts.hostport.lower()

    def repo_from_path(self, path: str) -> tuple[str, bool]:
        """The repository and namespace named by a credential `path` under our base URL."""
        under = path_under(self.base_url, path)
        if under is None:
            raise ConfigError(f"path {path.strip('/')!r} is not under {self.base_url}")
        return split_repo_path(under)


def _read_file(path: str, env: Mapping[str, str], cache: bool = True) -> dict[str, object]:
    """The parsed file ({} when there is none), through config_cache when `cache`."""
    from . import config_cache
    from .files import read_open_bounded

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            cached = config_cache.read(path, st, env) if cache else None
            if cached is not None:
                return cached
            data = read_open_bounded(f, path, "the configuration file")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    parsed = _parse(path, data)
    if cache:
        config_cache.write(path, st, parsed, env)
    return parsed


def _parse(path: str, data: bytes) -> dict[str, object]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); fix it or remove it") from None


_SETTINGS = ("org", "base_url", "api_url", "kid", "ttl", "scopes", "ephemeral_scopes", "sub", "private_key_file")


def load(env: Mapping[str, str] | None = None, *, cache: bool = True) -> Config:
    """Read the file, then let CODESTORE_* environment variables override it.

    `cache`: use and refresh the parsed copy (config_cache.py); off for a file that is
    about to be replaced or removed.
    """
    env = os.environ if env is None else env
    path = config_path(env)
    raw = _read_file(path, env, cache)
    values: dict[str, object] = {k: raw[k] for k in _SETTINGS if k in raw}
    unknown = set(raw) - set(_SETTINGS) - {"repos"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    sources = {k: path for k in values}
    for k in _SETTINGS:
        name = "CODESTORE_" + k.upper()
        v = getenv(env, name)
        if v:
            values[k] = v
            sources[k] = env_name(env, name)
    for k in ("org", "base_url", "api_url", "kid", "sub", "private_key_file"):
        if k in values and not isinstance(values[k], str):
            raise ConfigError(f"{path}: {k} must be a string")
    for k in ("base_url", "api_url"):
        if k in values:
            u = split_url(str(values[k]))
            if u.scheme not in ("http", "https") or not u.netloc or "@" in u.netloc or u.query or u.fragment:
                raise ConfigError(f"{k} {values[k]!r} must be an http(s) URL without credentials, query or fragment")
    rules = []
    repos = raw.get("repos", {})
    if not isinstance(repos, dict):
        raise ConfigError(f"{path}: [repos] must be a table of repository patterns")
    for pattern, rule in repos.items():
        if not isinstance(rule, dict) or set(rule) - {"scopes", "ephemeral_scopes"}:
            raise ConfigError(f"{path}: [repos.{pattern!r}] takes only scopes and ephemeral_scopes")
        rules.append(
            RepoRule(
                pattern,
                parse_scopes(rule["scopes"], f"repos.{pattern}") if "scopes" in rule else None,
                parse_scopes(rule["ephemeral_scopes"], f"repos.{pattern}")
                if "ephemeral_scopes" in rule
                else None,
            )
        )
    return Config(
        org=values.get("org") or None,
        base_url_setting=values.get("base_url") or None,
        api_url_setting=values.get("api_url") or None,
        kid=values.get("kid") or None,
        ttl=check_ttl(values["ttl"], sources["ttl"]) if "ttl" in values else DEFAULT_TTL,
        scopes=parse_scopes(values["scopes"], "scopes") if "scopes" in values else ("git:read",),
        ephemeral_scopes=parse_scopes(values["ephemeral_scopes"], "ephemeral_scopes")
        if "ephemeral_scopes" in values
        else None,
        sub_setting=values.get("sub") or None,
        private_key_file=values.get("private_key_file") or None,
        repos=tuple(rules),
        path=path,
    )


def set_value(key: str, value: str, env: Mapping[str, str] | None = None) -> str:
    """Write one top-level setting into the TOML file (used by `codestore config set`)."""
    if key not in _SETTINGS:
        raise ConfigError(f"unknown setting {key!r}; settings: {', '.join(_SETTINGS)}")
    path = config_path(env)
    lines = []
    from .files import read_bounded

    try:
        lines = read_bounded(path, "the configuration file").decode("utf-8").splitlines()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    import json

    new = f"{key} = {json.dumps(value)}"
    # Top-level keys live before the first table header.
    end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    for i in range(end):
        if lines[i].split("=", 1)[0].strip() == key:
            lines[i] = new
            break
    else:
        lines.insert(end, new)
    from .files import write_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Refuse a bad value now, not at the next git fetch: the new file is loaded first.
    write_atomic(path, "\n".join(lines) + "\n", 0o644, check=lambda tmp: load({"CODESTORE_CONFIG": tmp}, cache=False))
    _read_file(path, os.environ if env is None else env)  # the next git request reads the parsed copy
    return path
