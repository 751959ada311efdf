"""The workload's identity token, found without configuration (helper side, fast path).

With CODESTORE_AGENT_URL set and no grant, a helper sends the agent the identity its
sandbox provider gave it, and the agent exchanges it under a trust policy. Where it
looks, first found wins:

    CODESTORE_IDENTITY_TOKEN        the token itself
    CODESTORE_IDENTITY_TOKEN_FILE   a file holding it, read at every request (providers
                                    rotate it): a Kubernetes projected service-account
                                    token is configured this way
    MODAL_IDENTITY_TOKEN            Modal Functions and Sandboxes
                                    (Sandbox.create(include_oidc_identity_token=True))
    ACTIONS_ID_TOKEN_REQUEST_URL    GitHub Actions (`permissions: id-token: write`): a token
      + ACTIONS_ID_TOKEN_REQUEST_TOKEN  is requested for the audience the agent expects:
                                    CODESTORE_IDENTITY_AUDIENCE, else the agent URL itself

The explicit variables also work with CODESTORE_AGENT_SOCK; the providers' own are used
only with CODESTORE_AGENT_URL (an owner's agent on its own socket signs without them).

The identity token goes to the agent only, in the `Authorization: Identity` header,
never to Code Storage, into a URL, argv or a log. This module imports only `os` up front
(the GitHub request pulls `http.client`, `ssl` and `json` when it is needed); it checks
no signature: the agent does.
"""

from __future__ import annotations

import os

from ..errors import ConfigError, RemoteError
from ..secrets import Secret
from .discovery import AGENT_SOCK, AGENT_URL

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping

EXPLICIT = ("CODESTORE_IDENTITY_TOKEN", "CODESTORE_IDENTITY_TOKEN_FILE")
PROVIDED = ("MODAL_IDENTITY_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL")
GITHUB_TIMEOUT = 10.0
MAX_TOKEN = 16 * 1024
_JWT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def _checked(value: str, where: str) -> Secret:
    """A JWT's characters only: the value goes into an HTTP header, so no line breaks can pass."""
    value = value.strip()
    if not value or len(value) > MAX_TOKEN or value.count(".") != 2 or not _JWT_CHARS.issuperset(value):
        raise ConfigError(f"{where} does not hold an identity token (a JWT); check how it is set")
    return Secret(value)


class WorkloadIdentity:
    """Where the identity comes from, and how to get the token when a request needs it."""

    def __init__(self, where: str, env: Mapping[str, str]) -> None:
        self.where = where
        self.env = env

    def __repr__(self) -> str:
        return f"WorkloadIdentity({self.where})"

    def token(self) -> Secret:
        env = self.env
        if self.where == "CODESTORE_IDENTITY_TOKEN_FILE":
            path = os.path.expanduser(env["CODESTORE_IDENTITY_TOKEN_FILE"])
            from ..files import read_bounded  # a named pipe waited on for seconds, not forever

            try:
                value = read_bounded(path, "CODESTORE_IDENTITY_TOKEN_FILE", MAX_TOKEN + 1).decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read CODESTORE_IDENTITY_TOKEN_FILE {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
            return _checked(value, f"CODESTORE_IDENTITY_TOKEN_FILE {path}")
        if self.where == "ACTIONS_ID_TOKEN_REQUEST_URL":
            return _checked(github_token(env, audience(env)), "GitHub's ID-token endpoint reply")
        return _checked(env[self.where], self.where)


def audience(env: Mapping[str, str]) -> str:
    """The audience asked of a provider that lets the workload choose it (GitHub Actions).

    The agent's own URL by default: a token minted for one agent is then useless at any
    other relying party. `codestore trust add --audience` must name the same string.
    """
    return (env.get("CODESTORE_IDENTITY_AUDIENCE") or env.get(AGENT_URL) or "").strip().rstrip("/")


def find_identity(env: Mapping[str, str]) -> WorkloadIdentity | None:
    """The first identity present (see the module docstring), or None. Reads no file and no network."""
    if not (env.get(AGENT_URL) or env.get(AGENT_SOCK)):
        return None  # no agent named: nobody to send an identity to
    for name in EXPLICIT:
        if env.get(name, "").strip():
            return WorkloadIdentity(name, env)
    if not env.get(AGENT_URL):
        return None
    if env.get("MODAL_IDENTITY_TOKEN", "").strip():
        return WorkloadIdentity("MODAL_IDENTITY_TOKEN", env)
    if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        return WorkloadIdentity("ACTIONS_ID_TOKEN_REQUEST_URL", env)
    return None


def github_token(env: Mapping[str, str], aud: str) -> str:
    """Ask GitHub Actions' ID-token endpoint for a token with audience `aud`.

    The request token is a bearer secret: it goes only to the endpoint GitHub named, over
    HTTPS (plain http only on loopback), and a redirect is an error, never followed.
    """
    import http.client
    from urllib.parse import quote, urlsplit

    from .. import jsontext
    from ..vocab import is_loopback

    url = env["ACTIONS_ID_TOKEN_REQUEST_URL"]
    if not aud:
        raise ConfigError("no audience to ask GitHub for; set CODESTORE_IDENTITY_AUDIENCE")
    try:
        parts = urlsplit(url)  # an unclosed [IPv6 bracket raises here
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError("ACTIONS_ID_TOKEN_REQUEST_URL is not an http(s) URL; is this a GitHub Actions job?") from None
    if parts.scheme not in ("http", "https") or not host or parts.username is not None:
        raise ConfigError("ACTIONS_ID_TOKEN_REQUEST_URL is not an http(s) URL; is this a GitHub Actions job?")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError("ACTIONS_ID_TOKEN_REQUEST_URL is plain http; refusing to send the request token in clear")
    target = (parts.path or "/") + ("?" + parts.query + "&" if parts.query else "?") + "audience=" + quote(aud, safe="")
    if parts.scheme == "https":
        import ssl

        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, int(port or 443), timeout=GITHUB_TIMEOUT, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=GITHUB_TIMEOUT)
    request_token = env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"]
    if any(c in request_token for c in "\r\n\0"):
        raise ConfigError("ACTIONS_ID_TOKEN_REQUEST_TOKEN has a line break; is this a GitHub Actions job?")
    try:
        conn.request("GET", target, headers={"Authorization": f"bearer {request_token}", "Accept": "application/json"})
        reply = conn.getresponse()
        body = reply.read(MAX_TOKEN * 2)
        status = reply.status
    except (OSError, http.client.HTTPException) as e:
        raise RemoteError(f"cannot get an identity token from GitHub Actions ({type(e).__name__}); "
                          "does the job have `permissions: id-token: write`?") from None
    finally:
        conn.close()
    if status != 200:
        raise RemoteError(f"GitHub Actions' ID-token endpoint answered HTTP {status}; "
                          "does the job have `permissions: id-token: write`?")
    try:
        value = jsontext.loads(body).get("value")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str):
        raise RemoteError("GitHub Actions' ID-token endpoint sent no token")
    return value
