"""How a helper finds the agent: the one place that reads the agent's environment.

    CODESTORE_AGENT_URL   the agent over HTTP(S) (remote sandboxes); a grant is required;
                          several replicas comma-separated, tried in order
    CODESTORE_AGENT_SOCK  the agent's Unix socket (default <runtime dir>/codestore/agent.sock)
    CODESTORE_GRANT       the grant itself, or
    CODESTORE_GRANT_FILE  a file holding it (a mounted secret)
    CODESTORE_AGENT       "off": never use an agent; "auto": start one on demand
    CODESTORE_AGENT_CA    the CA file for an https agent (read where TLS is set up, client.py)
    CODESTORE_AGENT_KEY   the agent's PKCS#11 key URI (agent serve --key), which owners' helpers compare

Also here: socket paths (the owner socket, per-grant sockets next to it, a --socket
option), the AF_UNIX address of a long path, probing a socket, and starting an agent in
the background. The git helpers import this module, so it stays light: no json, socket,
re or typing at import (`socket` and `subprocess` only where a probe or a start needs them).
"""

from __future__ import annotations

import os
import sys

from ..config import Config, getenv
from ..errors import ConfigError, UsageError
from ..records import record
from ..secrets import Secret
from ..vocab import is_loopback, is_off, split_url

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Mapping

AGENT_URL = "CODESTORE_AGENT_URL"
AGENT_SOCK = "CODESTORE_AGENT_SOCK"
GRANT = "CODESTORE_GRANT"
GRANT_FILE = "CODESTORE_GRANT_FILE"
AGENT_MODE = "CODESTORE_AGENT"
AGENT_CA = "CODESTORE_AGENT_CA"
AGENT_KEY = "CODESTORE_AGENT_KEY"  # the agent's --key (a pkcs11: URI), when it signs through a token
AGENT_VARS = (AGENT_URL, AGENT_SOCK, GRANT, GRANT_FILE)
AUTOSTART_IDLE = 900  # seconds an on-demand agent lives without requests
SOCKET_NAME = "agent.sock"


def agent_named(env: Mapping[str, str]) -> bool:
    """The environment names the agent: its address, or a grant to present to it (a
    workload identity needs a named agent too, workload.find_identity).

    Then the agent, not local configuration, is the policy. The helpers ask it for at
    most what the operation needs (`narrow`) and it decides by who asks: a grant (its
    socket or its secret) gets the grant's terms, the owner what the agent's own
    configuration allows. A grant socket holds no secret, so only the agent can tell it
    is a grant's. Otherwise (the default socket found by discovery, or the local key)
    the helpers apply local scope configuration themselves.
    """
    return any(env.get(k) for k in AGENT_VARS)


def mode(env: Mapping[str, str]) -> str:
    """CODESTORE_AGENT: "off" (never an agent), "auto" (start one on demand) or "" (use one if running)."""
    value = env.get(AGENT_MODE, "")
    if value.strip() and is_off(value):
        return "off"
    return "auto" if value.strip().lower() == "auto" else ""


def key_uri(env: Mapping[str, str]) -> str:
    """The PKCS#11 key the agent signs with, as named to helpers and the agent alike ("" if none)."""
    return env.get(AGENT_KEY, "")


def ca_file(env: Mapping[str, str]) -> str | None:
    """The CA file to verify an https agent with (None: the system's CAs)."""
    return env.get(AGENT_CA) or None


def read_grant(env: Mapping[str, str]) -> Secret | None:
    value = env.get(GRANT, "").strip()
    if value:
        return _grant(value, GRANT)
    path = env.get(GRANT_FILE)
    if not path:
        return None
    from ..files import read_bounded

    try:
        value = read_bounded(os.path.expanduser(path), "CODESTORE_GRANT_FILE").decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read CODESTORE_GRANT_FILE {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    if not value:
        raise ConfigError(f"CODESTORE_GRANT_FILE {path} is empty; write the grant from `codestore grant create` into it")
    return _grant(value, f"CODESTORE_GRANT_FILE {path}")


MAX_GRANT = 256  # a grant secret is ~60 characters (csg_<id>_<random>)


def _grant(value: str, where: str) -> Secret:
    """The grant as the one header token it is sent as: no spaces, no line breaks, nothing but
    printable ASCII (anything else would add lines to the request, or is not a grant)."""
    if len(value) > MAX_GRANT or not value.isascii() or not value.isprintable() or " " in value:
        raise ConfigError(f"{where} does not hold one grant secret (csg_...); put only the secret that `codestore grant create` "
                          "printed in it, nothing else")
    return Secret(value)


def runtime_dir(env: Mapping[str, str] | None = None) -> str:
    """Where the agent's sockets live: $XDG_RUNTIME_DIR/codestore, else /run/user/<uid>/codestore.

    Without either (containers, cron, su), a private directory of our own in the temp dir,
    as tmux and ssh-agent do: `$TMPDIR/codestore-<uid>`. The agent creates it 0700 and
    refuses it when it belongs to someone else (server.prepare_socket_dir).
    """
    env = os.environ if env is None else env
    if sys.platform.startswith(("linux", "freebsd", "openbsd")):
        base = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        if not env.get("XDG_RUNTIME_DIR") and not os.path.isdir(base):
            return os.path.join(env.get("TMPDIR") or "/tmp", f"codestore-{os.getuid()}")  # noqa: S108 - private, checked
        return os.path.join(base, "codestore")
    from platformdirs import user_runtime_dir

    return user_runtime_dir("codestore")


def default_socket(env: Mapping[str, str] | None = None) -> str:
    return os.path.join(runtime_dir(env), SOCKET_NAME)


def grant_socket(owner_socket: str, grant_id: str) -> str:
    """A grant's dedicated socket (`grant create --own-socket`), next to the owner socket."""
    return os.path.join(os.path.dirname(owner_socket), f"grant-{grant_id}.sock")


def socket_path(option: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The owner socket the CLI talks to: --socket, else CODESTORE_AGENT_SOCK, else the default."""
    env = os.environ if env is None else env
    return os.path.abspath(os.path.expanduser(option or env.get(AGENT_SOCK) or default_socket(env)))


class unix_address:  # lower case: read as a function, `with unix_address(path) as addr:`
    """An AF_UNIX address for `path`, even beyond the ~107-byte sun_path limit, for a
    bind or connect inside the `with` block.

    Long paths (deep temp dirs) go through /proc/self/fd/N of the open directory on
    Linux; the directory is closed when the block ends, however it ends. A class rather
    than contextlib's decorator: this module is on the helpers' fast path.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> str:
        if len(self.path.encode()) < 100 or not os.path.isdir("/proc/self/fd"):
            return self.path
        self.fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{os.path.basename(self.path)}"

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Endpoint(record("Endpoint", "kind address port", defaults=(0,))):
    """Where the agent listens: a Unix socket path, or an http(s) URL."""

    __slots__ = ()
    kind: str  # "unix" | "http" | "https"
    address: str  # socket path, or host
    port: int

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """The endpoint of one entry of CODESTORE_AGENT_URL; UsageError or ConfigError naming
        the fix in one line. The entry is never quoted back: a mistyped one can hold a
        password (`admin:pw@host` without `http://`), and the line lands in git's output."""
        form = "it must be http(s)://HOST:PORT, e.g. https://agent.internal:7878"
        parts = split_url(url)
        if not parts.scheme:
            raise UsageError(f"an entry of CODESTORE_AGENT_URL has no http:// or https://; {form}")
        if parts.scheme not in ("http", "https"):
            # split_url takes only a scheme's own characters (letters, digits, + - .): no secret.
            raise UsageError(f"CODESTORE_AGENT_URL takes http:// and https:// URLs, not {parts.scheme}://; {form}")
        if parts.userinfo is not None or parts.query:
            # A grant in a URL would land in logs and argv: exactly what we exist to prevent.
            raise ConfigError("CODESTORE_AGENT_URL must not carry credentials or a query; put the grant in CODESTORE_GRANT_FILE")
        if parts.path.strip("/") or parts.fragment:
            # The agent answers at its root: a path would be dropped, and a gateway's prefix
            # with it (its pages would then read as a replica that is not an agent).
            raise UsageError(f"CODESTORE_AGENT_URL takes no path: the agent answers at its root; {form}")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 or not host_name_ok(parts.host):
            raise UsageError(f"CODESTORE_AGENT_URL has a bad host or port (a port is 1-65535, an IPv6 host is in []); {form}")
        if parts.scheme == "http" and not is_loopback(parts.host):
            # The grant is a reusable secret: never in clear text across a network.
            raise ConfigError(
                f"refusing to send a grant over plain http to {parts.host}; use https:// "
                "(the agent serves TLS with --tls-cert/--tls-key) or a loopback address"
            )
        return cls(parts.scheme, parts.host, port or (443 if parts.scheme == "https" else 80))

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.address
        host = f"[{self.address}]" if ":" in self.address else self.address  # an IPv6 address, as a URL writes it
        return f"{self.kind}://{host}:{self.port}"


def host_name_ok(host: str) -> bool:
    """Whether `host` can be connected to by name: an IPv6 address (it has a colon; a wrong one
    is refused at connect, in one line), or labels of 1-63 characters that IDNA can encode. A
    name it cannot (a..b, a 64-character label) would otherwise fail deep in the socket
    module with an error that is not an OSError."""
    if not host or ":" in host:
        return bool(host)
    if host.isascii():  # the common case, without importing the idna codec (2 ms)
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        return all(0 < len(label) <= 63 for label in labels)
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def endpoints_from_env(env: Mapping[str, str]) -> list[Endpoint]:
    """The agent replicas to try, in order: CODESTORE_AGENT_URL (comma-separated), else the socket."""
    value = env.get(AGENT_URL, "")
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if urls:
        return [Endpoint.from_url(u) for u in urls]
    if value.strip():  # ",,," named an agent and none: not a reason to ask another one
        from ..errors import UsageError

        raise UsageError(f"{AGENT_URL} names no URL; give one or more, comma-separated: http(s)://HOST:PORT")
    return [Endpoint("unix", os.path.expanduser(env.get(AGENT_SOCK) or default_socket(env)))]


def endpoint_from_env(env: Mapping[str, str]) -> Endpoint:
    """The first (or only) agent: where the CLI and diagnostics look."""
    return endpoints_from_env(env)[0]


def answers(path: str, exists: bool) -> bool:
    """True when something accepts connections at the socket (a 0.5 s bound, no request)."""
    if not exists:
        return False
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        with unix_address(path) as addr:
            s.connect(addr)
        return True
    except OSError:
        return False
    finally:
        s.close()


def key_file_present(cfg: Config, env: Mapping[str, str]) -> bool:
    """A key an agent could load, found without touching the keychain (that import is slow)."""
    if not cfg.uses_env:
        env = {}  # an [orgs.*] section: the environment's key is another org's
    if getenv(env, "CODESTORE_PRIVATE_KEY").strip():
        return True
    path = getenv(env, "CODESTORE_PRIVATE_KEY_FILE") or cfg.private_key_file
    if path:
        return os.path.exists(os.path.expanduser(path))
    from platformdirs import user_data_dir

    return os.path.exists(os.path.join(user_data_dir("codestore"), "keys", f"{cfg.org or 'default'}.pem"))


def spawn(socket_path: str, *, idle_timeout: int = 0, extra: tuple[str, ...] = (), log_path: str | None = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `codestore agent serve` detached from this process.

    Used by `codestore agent start` and by helpers starting an agent on demand. The
    child gets its own session, so git's or the shell's Ctrl-C and hang-up leave it alone.
    """
    import subprocess

    args = [sys.executable, "-m", "git_credential_codestore.cli", "agent", "serve", "--socket", socket_path]
    if idle_timeout:
        args += ["--idle-timeout", str(idle_timeout)]
    args += list(extra)
    out = subprocess.DEVNULL
    if log_path:
        os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
        from ..files import open_append

        out = open_append(log_path)  # a pipe nobody reads fails here (one line), never holds `agent start`
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
                                env=dict(env) if env is not None else None)
    finally:
        if log_path:
            os.close(out)
    return proc
