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

The file holds the same settings in lower case, plus per-repository rules, and other
orgs in [orgs.NAME] sections with the same settings (see `load` for which one applies):

    org = "acme"
    scopes = "git:read"
    [repos."team/*"]
    ephemeral_scopes = "git:read git:write"
    [orgs.personal]
    org = "me"
    kid = "me-key-1"

(CODESTORE_TRACE, read by trace.py, says which file and section each request used.)

This module is imported on every credential request, so it stays light: no crypto.
"""

from __future__ import annotations

import os
import sys

from .errors import ConfigError, PolicyError
from .lines import has_control
from .records import record
from .vocab import (
    DEFAULT_TTL,
    EPHEMERAL_SUFFIX,
    allows,
    check_ttl,
    is_off,
    is_org,
    parse_scopes,
    path_under,
    split_repo_path,
    split_url,
    with_implied,
)

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
    return not is_off(getenv(env, "CODESTORE_DEBUG"))


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


def hostname() -> str:
    """This machine's name. os.uname where it exists (socket's import is a cost every git
    request would pay); Windows has no os.uname, so there socket.gethostname."""
    uname = getattr(os, "uname", None)
    if uname is not None:
        return str(uname().nodename)
    import socket

    return socket.gethostname()


class RepoRule(record("RepoRule", "pattern scopes ephemeral_scopes", defaults=(None, None))):
    __slots__ = ()
    pattern: str
    scopes: tuple[str, ...] | None
    ephemeral_scopes: tuple[str, ...] | None


class Config(
    record(
        "Config",
        "org base_url_setting api_url_setting kid ttl scopes ephemeral_scopes sub_setting private_key_file repos path"
        " name uses_env",
        defaults=(None, None, None, None, DEFAULT_TTL, ("git:read",), None, None, None, (), "", "", True),
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
    # The [orgs.NAME] section these settings came from; "" for the top-level (default) org.
    name: str
    # Whether the CODESTORE_* environment (its key, agent and grant too) speaks for this org:
    # false for an [orgs.*] section, so one org's key never signs for another.
    uses_env: bool

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
        return self.sub_setting or f"codestore@{hostname()}"

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

    def narrow(self, repo: str, ephemeral: bool, ceiling: Sequence[str], agent: bool = False) -> tuple[str, ...]:
        """The scopes of `ceiling` this configuration allows for the repository and namespace,
        each with what it implies (git:write includes read): least privilege for a request
        that names at most what it needs (a push: git:write; a fetch: git:read).

        PolicyError, naming the setting to change, when none is left. `agent`: these are
        the settings the agent runs with (the owner asking it), so the fix is made there.
        """
        allowed = self.scopes_for(repo, ephemeral)
        kept = [s for s in ceiling if allows(allowed, s)]
        if kept:
            return with_implied(kept)
        whose = "the agent's configuration" if agent else "configuration"
        space = f"the {EPHEMERAL_SUFFIX} namespace" if ephemeral else "the default namespace"
        if "git:write" in ceiling and "git:read" not in ceiling:  # a push
            var, setting = ("CODESTORE_EPHEMERAL_SCOPES", "ephemeral_scopes") if ephemeral else ("CODESTORE_SCOPES", "scopes")
            refused = f"{whose} forbids writing to {repo} in {space} (allowed scopes: {' '.join(allowed)}); "
            where = self.path or "the config file"
            if agent:  # the agent's refusals are kept short (errors.Refused): the setting, where, and what then
                raise PolicyError(f"{refused}set `{setting} = \"git:read git:write\"` in {where} (or {var}) and restart the agent")
            other = "" if ephemeral else f"push to codestore://{self.org}/{repo}+ephemeral instead, or "
            raise PolicyError(
                f"{refused}{other}allow it with {var}=\"git:read git:write\" or `{setting} = \"git:read git:write\"` in {where}"
            )
        raise PolicyError(
            f"{whose} allows no {' or '.join(ceiling)} for {repo} in {space} (allowed scopes: {' '.join(allowed) or 'none'}); "
            f"add {ceiling[0]} to its scopes{' and restart the agent' if agent else ''}"
        )

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
    from .files import open_nonblocking

    try:
        fd = open_nonblocking(path)
        try:
            st = os.fstat(fd)
            cached = config_cache.read(path, st, env) if cache else None
            if cached is not None:
                return cached
            from .files import read_fd_bounded  # the cache missed: the file changed

            data = read_fd_bounded(fd, path, "the configuration file")
        finally:
            os.close(fd)
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


def load(
    env: Mapping[str, str] | None = None,
    *,
    host: tuple[str, str] | None = None,
    org: str | None = None,
    cache: bool = True,
) -> Config:
    """The settings for one org: the top-level (default) org, or an [orgs.NAME] section.

    Which one: with `host` (git's protocol and host, from the credential helper), the
    org whose base URL that is; with `org` (from a codestore://ORG/... URL), that org;
    otherwise CODESTORE_ORG (or `codestore --org`) when it names a section (by its name
    or its org). Anything else, and no match, is the default org. Environment variables
    override the default org's settings only: a section takes its settings from the file
    alone, so the environment's CODESTORE_KID, key or grant never signs for another org.

    `cache`: use and refresh the parsed copy (config_cache.py); off for a file that is
    about to be replaced or removed.
    """
    env = os.environ if env is None else env
    path = config_path(env)
    raw = _read_file(path, env, cache)
    unknown = set(raw) - set(_SETTINGS) - {"repos", "orgs"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    sections = _sections(raw, path)
    from .trace import say

    default = _build(raw, env, path, "")
    chosen: Config | None = None
    if host is not None and not default.serves(*host):
        chosen = next((c for c in (_build(v, {}, path, n, False) for n, v in sections.items()) if c.serves(*host)), None)
    elif org is not None and (default.org or "").lower() != org.lower():
        name = _section_for(sections, org)
        chosen = _build(sections[name], {}, path, name, False) if name else None
    elif host is None and org is None and env.get("CODESTORE_ORG"):
        name = _section_for(sections, env["CODESTORE_ORG"])
        chosen = _build(sections[name], {}, path, name, False) if name else None
    cfg = chosen or default
    if sections:
        say("config", f"org section {'[orgs.' + cfg.name + ']' if cfg.name else '(default, top level)'} "
            f"for {'host ' + host[1] if host else 'org ' + org if org else 'this command'}", env)
    return cfg


def _sections(raw: Mapping[str, object], path: str) -> dict[str, dict[str, object]]:
    orgs = raw.get("orgs", {})
    if not isinstance(orgs, dict) or not all(isinstance(v, dict) for v in orgs.values()):
        raise ConfigError(f"{path}: [orgs] must hold tables like [orgs.personal] with that org's settings")
    for name, section in orgs.items():
        if not is_org(name):  # a section's name is its org when it sets none: the same rule as any org name
            raise ConfigError(f"{path}: [orgs.{str(name)[:64]!r}]: a section's name is an org name (a DNS label: letters, digits and '-')")
        extra = set(section) - set(_SETTINGS) - {"repos"}
        if extra:
            raise ConfigError(f"{path}: [orgs.{name}]: unknown setting(s) {', '.join(sorted(extra))}")
    return orgs


def _section_for(sections: Mapping[str, Mapping[str, object]], org: str) -> str | None:
    """The section named `org`, or whose `org` setting is `org` (case-insensitive)."""
    org = org.lower()
    if not org:
        return None
    for name, section in sections.items():
        if name.lower() == org or str(section.get("org", "")).lower() == org:
            return name
    return None


def section_to_write(org: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where `codestore --org ORG config set` writes: None for the top-level org, else
    the [orgs.*] section for ORG (an existing one by name or org, or a new one named ORG)."""
    env = os.environ if env is None else env
    path = config_path(env)
    raw = _read_file(path, env)
    if str(raw.get("org", "")).lower() == org.lower():
        return None
    return _section_for(_sections(raw, path), org) or org


def all_orgs(env: Mapping[str, str] | None = None, *, cache: bool = True) -> list[Config]:
    """Every org this machine is configured for: the default (if it names one) and each section."""
    env = os.environ if env is None else env
    path = config_path(env)
    raw = _read_file(path, env, cache)
    unknown = set(raw) - set(_SETTINGS) - {"repos", "orgs"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    sections = _sections(raw, path)
    # CODESTORE_ORG naming a section chooses that section; it does not rename the default.
    if _section_for(sections, env.get("CODESTORE_ORG", "")):
        env = {k: v for k, v in env.items() if k != "CODESTORE_ORG"}
    default = _build(raw, env, path, "")
    out = [default] if default.org or default.base_url_setting else []
    out += [_build(section, {}, path, name, False) for name, section in sections.items()]
    return out or [default]


def _host_port(netloc: str) -> bool:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT, as an HTTP client can connect to it."""
    if netloc.startswith("["):
        host, sep, port = netloc[1:].partition("]")
        port = port.removeprefix(":") if port.startswith(":") else ("x" if port else "")
        ok = bool(sep and host) and ":" in host
    else:
        host, _, port = netloc.partition(":")
        ok = bool(host) and "[" not in host and "]" not in host
    return ok and (not port or (port.isascii() and port.isdigit() and int(port) < 65536))


def _build(raw: Mapping[str, object], env: Mapping[str, str], path: str, name: str, uses_env: bool = True) -> Config:
    """One org's Config: `raw` (top level or a section) overridden by `env`."""
    where = f"{path} [orgs.{name}]" if name else path
    values: dict[str, object] = {k: raw[k] for k in _SETTINGS if k in raw}
    if name and "org" not in values:
        values["org"] = name  # [orgs.acme] with no org setting is the org acme
    from_env: list[str] = []
    sources = {k: where for k in values}
    for k in _SETTINGS:
        var = "CODESTORE_" + k.upper()
        v = getenv(env, var)
        if v:
            values[k] = v
            from_env.append(k)
            sources[k] = env_name(env, var)
    for k in ("org", "base_url", "api_url", "kid", "sub", "private_key_file"):
        if k in values and not isinstance(values[k], str):
            raise ConfigError(f"{where}: {k} must be a string")
    org = values.get("org")
    if org and not is_org(str(org)):
        # It names the org's host and its key file (keys/ORG.pem): "../x" would be a path.
        raise ConfigError(f"{sources['org']}: org {str(org)[:64]!r} is not an org name (a DNS label: letters, digits and '-')")
    for k in ("kid", "sub"):
        text = values.get(k)
        if isinstance(text, str) and (has_control(text) or len(text) > 256):
            raise ConfigError(f"{sources[k]}: {k} must be one line of at most 256 characters, without control characters")
    for k in ("scopes", "ephemeral_scopes"):
        if k in values and not parse_scopes(values[k], k):
            raise ConfigError(f"{sources[k]}: {k} is empty; name at least one, e.g. git:read")
    for k in ("base_url", "api_url"):
        if k in values:
            u = split_url(str(values[k]))
            text = str(values[k])
            if not text.isascii() or not text.isprintable() or " " in text:  # it lands in git config and HTTP requests
                raise ConfigError(f"{sources[k]}: {k} must be an http(s) URL of printable characters, without spaces")
            if u.scheme not in ("http", "https") or not _host_port(u.netloc) or "@" in u.netloc or u.query or u.fragment:
                raise ConfigError(f"{k} {values[k]!r} must be an http(s) URL without credentials, query or fragment")
    from .trace import say

    # Setting names only, never values. (A section built with env={} traces nothing here.)
    say("config", f"{where} {'read' if raw else '(absent or empty)'}; from the environment: {', '.join(from_env) or 'nothing'}", env)
    rules = []
    repos = raw.get("repos", {})
    if not isinstance(repos, dict):
        raise ConfigError(f"{where}: [repos] must be a table of repository patterns")
    for pattern, rule in repos.items():
        if not pattern.isprintable():
            raise ConfigError(f"{where}: a [repos] pattern must be printable text (a repository id or glob)")
        if not isinstance(rule, dict) or set(rule) - {"scopes", "ephemeral_scopes"}:
            raise ConfigError(f"{where}: [repos.{pattern!r}] takes only scopes and ephemeral_scopes")
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
        name=name,
        uses_env=uses_env,
    )


def set_value(key: str, value: str, env: Mapping[str, str] | None = None, section: str | None = None) -> str:
    """Write one setting into the TOML file (used by `codestore config set`): at the top
    level (the default org), or into [orgs.SECTION], created when missing."""
    if key not in _SETTINGS:
        raise ConfigError(f"unknown setting {key!r}; settings: {', '.join(_SETTINGS)}")
    if section is not None and not (section.replace("-", "").isalnum() and section.isascii()):
        raise ConfigError(f"{section!r} is not an org name (letters, digits and '-')")
    shown = config_path(env)
    path = os.path.realpath(shown)  # a symlinked config.toml (dotfiles): its target is the file to change
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    import fcntl

    # Read, change, replace under a lock: two `config set` at once each keep the other's change.
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot write {shown} ({e.strerror}); check the permissions of {os.path.dirname(path)}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _set_value(key, value, env, section, shown, path)
    finally:
        os.close(lock)


def _set_value(key: str, value: str, env: Mapping[str, str] | None, section: str | None, shown: str, path: str) -> str:
    lines = []
    mode = 0o644
    from .files import read_bounded

    try:
        lines = read_bounded(path, "the configuration file").decode("utf-8").splitlines()
        mode = os.stat(path).st_mode & 0o644  # kept, never writable by others: a 0600 file stays 0600
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {shown}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    import json

    new = f"{key} = {json.dumps(value)}"
    # A table's keys live between its header and the next header; the top level's, before any.
    start = 0
    if section is not None:
        header = next((i for i, ln in enumerate(lines) if ln.strip() in (f"[orgs.{section}]", f'[orgs."{section}"]')), None)
        if header is None:
            lines += ([""] if lines else []) + [f"[orgs.{section}]"]
            header = len(lines) - 1
        start = header + 1
    end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    for i in range(start, end):
        if lines[i].split("=", 1)[0].strip() == key:
            lines[i] = new
            break
    else:
        # After the table's last setting, before any blank lines that separate it from the next.
        at = end
        while at > start and not lines[at - 1].strip():
            at -= 1
        lines.insert(at, new)
    from .files import write_atomic

    def check(tmp: str) -> None:
        try:
            all_orgs({"CODESTORE_CONFIG": tmp}, cache=False)
        except ConfigError as e:  # about the file as it would be: named as the user knows it
            raise ConfigError(str(e).replace(tmp, shown)) from None

    # Refuse a bad value now, not at the next git fetch: the new file (every org in it) is loaded first.
    try:
        write_atomic(path, "\n".join(lines) + "\n", mode, check=check)
    except OSError as e:
        raise ConfigError(f"cannot write {shown} ({e.strerror}); check the permissions of {os.path.dirname(path)}") from None
    _read_file(shown, os.environ if env is None else env)  # the next git request reads the parsed copy
    return shown
