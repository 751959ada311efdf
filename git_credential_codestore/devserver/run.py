"""Start the dev server: resolve options, prepare the data directory, serve until signalled.

The first stdout line is a contract with scripts and tests:
`codestore dev-server: serving URL ...`, flushed, printed only once the socket listens.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence

from .. import config, keys
from ..errors import ConfigError, KeyNotFound, UsageError
from ..tokens import PublicKey
from ..vocab import is_loopback
from .hooks import install
from .repos import RepoStore
from .server import IDLE_TIMEOUT, ServerState, default_max_connections, find_http_backend, make_server


def default_data_dir() -> str:
    from platformdirs import user_data_dir

    return os.path.join(user_data_dir("codestore"), "dev-server")


def parse_trust_key(spec: str) -> tuple[str, str | None]:
    """`FILE[:KID]`; a path that itself exists wins over splitting at its last colon."""
    if os.path.exists(spec):
        return spec, None
    path, sep, kid = spec.rpartition(":")
    if sep and path and kid:
        if not kid.isascii() or not kid.isprintable() or len(kid) > 256:  # a token header's value, printed when serving
            raise UsageError("--trust-key FILE:KID: the kid must be printable text of at most 256 characters")
        return path, kid
    return spec, None


def trusted_keys(specs: Sequence[str], cfg: config.Config) -> dict[str, PublicKey]:
    out: dict[str, PublicKey] = {}
    if not specs:
        try:
            private, where = keys.load_private_key(cfg)
        except KeyNotFound as e:
            raise KeyNotFound(f"{e}; or pass --trust-key PUBLIC.pem:KID") from None
        out[cfg.kid or f"<{where}>"] = private.public_key()
        return out
    for spec in specs:
        path, kid = parse_trust_key(spec)
        from ..files import read_bounded  # bounded, and a pipe waited on for seconds: /dev/zero grew memory without end

        try:
            pem = read_bounded(path, "--trust-key")
        except OSError as e:
            raise ConfigError(f"cannot read --trust-key {path}: {e.strerror}") from None
        # A key without a KID only verifies tokens without one (the official SDK's).
        label = kid or f"<{os.path.basename(path)}>"
        if label in out:
            raise UsageError(f"--trust-key: kid {label!r} given twice")
        out[label] = keys.load_public_key(pem, path)
    return out


def git_environment(data_dir: str, hooks_dir: str) -> dict[str, str]:
    """git as the server runs it: no system or user config, our hook, nothing inherited."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": data_dir,
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.path.join(data_dir, "gitconfig"),
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        # Command-line level config outranks anything in a repository's own config.
        "GIT_CONFIG_COUNT": "4",
        "GIT_CONFIG_KEY_0": "core.hooksPath",
        "GIT_CONFIG_VALUE_0": hooks_dir,
        "GIT_CONFIG_KEY_1": "uploadpack.allowFilter",
        "GIT_CONFIG_VALUE_1": "true",
        "GIT_CONFIG_KEY_2": "receive.fsckObjects",
        "GIT_CONFIG_VALUE_2": "true",
        # Without GIT_NAMESPACE git advertises every ref, including the ephemeral
        # namespace's `refs/namespaces/ephemeral/...`, and would accept pushes to them
        # from the default namespace (where `refs/heads/*` policies do not match them).
        # Hidden refs are neither advertised nor updatable. Under GIT_NAMESPACE the
        # pattern is matched against the stripped name, hiding only nested namespaces.
        "GIT_CONFIG_KEY_3": "transfer.hideRefs",
        "GIT_CONFIG_VALUE_3": "refs/namespaces/",
    }
    for k in ("SYSTEMROOT", "TMPDIR"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def serve(
    *,
    host: str,
    port: int,
    data_dir: str | None,
    org: str | None,
    trust_keys: Sequence[str],
    log_path: str | None,
    tls: bool,
    env: Mapping[str, str] | None = None,
    max_connections: int | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> None:
    if not tls and not is_loopback(host):
        raise UsageError(
            f"refusing plain HTTP on non-loopback address {host}: tokens would cross the network in clear; add --tls"
        )
    cfg = config.load(env)
    org = org or cfg.org or "dev"
    from ..vocab import is_org

    if not is_org(org):
        raise UsageError(f"--org {org[:64]!r} is not an org name (a DNS label: letters, digits and '-')")
    data = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    os.makedirs(data, mode=0o700, exist_ok=True)
    key_map = trusted_keys(trust_keys, cfg)
    hooks_dir = install(os.path.join(data, "hooks"))
    git_env = git_environment(data, hooks_dir)
    http_backend = find_http_backend(git_env)
    if not os.path.exists(git_env["GIT_CONFIG_GLOBAL"]):
        with open(git_env["GIT_CONFIG_GLOBAL"], "w", encoding="utf-8") as f:
            f.write("# git configuration for codestore dev-server's repositories\n")
    store = RepoStore(os.path.join(data, "repos"), git_env)
    log_file_path = os.path.abspath(log_path or os.path.join(data, "requests.log"))
    os.makedirs(os.path.dirname(log_file_path), exist_ok=True)
    try:
        from ..files import open_append

        fd = open_append(log_file_path)
    except OSError as e:
        raise ConfigError(f"cannot open the request log {log_file_path}: {e.strerror}") from None
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"the request log {log_file_path} is not a regular file; pass --log a file path")
    log_file = open(fd, "ab")  # noqa: SIM115 - open for the server's lifetime

    wrap = None
    ca_path = None
    if tls:
        from .tls import ensure_certificate, server_context

        ca_path, cert_path, key_path = ensure_certificate(os.path.join(data, "tls"), host)
        ctx = server_context(cert_path, key_path)

        def wrap(sock: socket.socket) -> socket.socket:
            # The handshake happens in the connection's own thread, not in accept().
            return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    state = ServerState(org=org, keys=key_map, store=store, http_backend=http_backend, git_env=git_env, log_file=log_file, tls=tls)
    server = make_server(host, port, state, wrap)
    server.max_connections = max_connections or default_max_connections()
    server.idle_timeout = idle_timeout
    bound_host, bound_port = server.socket.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
    url = f"{'https' if tls else 'http'}://{shown}:{bound_port}"
    state.base_url = url

    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        # No exception raised into whatever the main thread is doing (socketserver would
        # swallow it mid-request): ask serve_forever to return, from another thread
        # because shutdown() waits for it.
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    kids = ", ".join(sorted(key_map))
    extra = f"; CA certificate {ca_path} (git config http.sslCAInfo {ca_path})" if ca_path else ""
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"codestore dev-server: serving {url} (org {org}, keys {kids}, data {data}, log {log_file_path}{extra})", flush=True)
        if not stopping.is_set():  # a client may signal us the moment it reads that line
            server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        log_file.close()
    print("codestore dev-server: stopped", file=sys.stderr, flush=True)
