"""Run git's own HTTPS transport with a token that only it can read, once.

`git remote-https` does the real work. It gets the token as an `http.extraHeader` from
a configuration file that exists only in memory (a memfd, or a private file where there
is none), included through GIT_CONFIG_PARAMETERS as `include.path=/dev/fd/N`. Not in
argv (world-readable in /proc), not in a URL (GIT_TRACE prints those), not in a config
file on disk, and not in the environment: the transport's children (send-pack,
pack-objects, fetch-pack, index-pack) inherit the environment, and git's trace2 reports
environment variables and config values in `def_param` events wherever
GIT_TRACE2_ENV_VARS or trace2.configParams name them. Once the transport has answered
its first line it has read its configuration, and the file is emptied: every later
reader, its children included, finds nothing there.

The same file, read last of all configuration, pins for the exact repository URL (the
most specific key git's urlmatch knows, and last among equals) that redirects are not
followed (the header would go to whatever host a redirect names), and empties the
credential helper list (nothing may see or store the token); prompts are off so a
headless sandbox never hangs.

After the replay of what git already said, bytes pass both ways untouched: with
os.splice between pipes, so a large pack never crosses Python's memory.
"""

from __future__ import annotations

import binascii
import errno
import os
import time

from git_credential_codestore.errors import ConfigError, expired_during_push
from git_credential_codestore.secrets import Token

from .protocol import CAPABILITIES, Decision, LineReader, ProtocolError

# This module is inside the helpers' fast path (fastpath.py): threading and re are
# imported only once a transfer starts or fails, typing only by the type checker, and the
# transport is started without subprocess (whose import brings re, through locale).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import IO, Protocol

    class Child(Protocol):
        """What the session needs of the transport's process (a Popen fits, as does Spawned)."""

        @property
        def stdin(self) -> IO[bytes] | None: ...
        @property
        def stdout(self) -> IO[bytes] | None: ...
        @property
        def stderr(self) -> IO[bytes] | None: ...
        def wait(self) -> int: ...
        def kill(self) -> None: ...
        def terminate(self) -> None: ...

CHUNK = 1 << 20


def _sq(text: str) -> str:
    """git's sq_quote: the quoting GIT_CONFIG_PARAMETERS expects."""
    return "'" + text.replace("'", "'\\''").replace("!", "'\\!'") + "'"


def _subsection(url: str) -> str:
    return '"' + url.replace("\\", "\\\\").replace('"', '\\"') + '"'


def token_config(token: Token, url: str, remote_name: str) -> bytes:
    """The transport's private configuration: the header and the guards, for `url` exactly.

    Read last (child_env), so it wins over every other source: no redirect is followed;
    no host is resolved to another address (`http.curloptResolve`: an empty value clears
    the list); an https server's certificate is verified; and plain http, which is for a
    loopback server only, goes through no proxy, which would read the header in clear
    text: neither `http.proxy` nor `remote.<name>.proxy`, which git applies after every
    `http.*` setting (`transport_argv` runs the transport under the remote's name)."""
    basic = binascii.b2a_base64(f"t:{token.reveal()}".encode(), newline=False).decode("ascii")
    plain = url.startswith("http://")
    return (
        "[credential]\n\thelper =\n"
        "[http]\n\tfollowRedirects = false\n\tcurloptResolve =\n"
        f"[http {_subsection(url)}]\n"
        f"\textraHeader = Authorization: Basic {basic}\n"
        "\tfollowRedirects = false\n"
        + ("\tproxy =\n" if plain else "\tsslVerify = true\n")
        + (f"[remote {_subsection(remote_name)}]\n\tproxy =\n" if plain else "")
    ).encode()


class PrivateConfig:
    """A configuration file for one transport process, read while it starts, then emptied."""

    def __init__(self, text: bytes) -> None:
        self._dir: str | None = None
        if hasattr(os, "memfd_create"):
            self.fd: int | None = os.memfd_create("codestore-transport", os.MFD_CLOEXEC)
            os.write(self.fd, text)
            self.path = f"/dev/fd/{self.fd}"
            self.pass_fds: tuple[int, ...] = (self.fd,)
        else:  # pragma: no cover - platforms without memfd
            import tempfile

            self.fd = None
            self._dir = tempfile.mkdtemp(prefix="codestore-")  # 0700
            self.path = os.path.join(self._dir, "config")
            with open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(text)
            self.pass_fds = ()

    def forget(self) -> None:
        """Empty it: later readers (the transport's children) find nothing. Idempotent."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
        if self._dir is not None:
            for path in (self.path, self._dir):
                try:
                    (os.rmdir if path == self._dir else os.unlink)(path)
                except OSError:
                    pass
            self._dir = None


def child_env(env: Mapping[str, str], config: PrivateConfig) -> dict[str, str]:
    """`env` plus the include of the private configuration, read after all other config."""
    out = dict(env)
    # GIT_CONFIG_PARAMETERS is read after every file and after GIT_CONFIG_COUNT, and an
    # include is expanded where it stands: last of all, so nothing can override it.
    include = f"{_sq('include.path')}={_sq(config.path)}"
    params = out.get("GIT_CONFIG_PARAMETERS", "").strip()
    out["GIT_CONFIG_PARAMETERS"] = f"{params} {include}" if params else include
    out["GIT_TERMINAL_PROMPT"] = "0"
    # GIT_TRACE_REDACT=0 would print the header in GIT_TRACE_CURL: the token is ours to guard.
    out["GIT_TRACE_REDACT"] = "1"
    # An empty GIT_ASKPASS also wins over core.askPass and SSH_ASKPASS: no GUI prompt either.
    out["GIT_ASKPASS"] = ""
    return out


def transport_argv(remote_name: str, url: str, env: Mapping[str, str]) -> list[str]:
    """git-remote-http(s) straight from git's exec path when git told us where it is."""
    name = "remote-http" if url.startswith("http://") else "remote-https"
    exec_path = env.get("GIT_EXEC_PATH")
    if exec_path and os.access(os.path.join(exec_path, "git-" + name), os.X_OK):
        return [os.path.join(exec_path, "git-" + name), remote_name, url]
    return ["git", name, remote_name, url]


def spawn(argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int] = ()) -> Child:
    try:
        if hasattr(os, "posix_spawn"):
            return Spawned(argv, env, pass_fds)
        import subprocess

        return subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            pass_fds=tuple(pass_fds),
        )
    except OSError as e:
        raise ConfigError(f"cannot run git's HTTPS transport ({e.strerror}); is git 2.39 or newer installed?") from None


def _which(program: str, env: Mapping[str, str]) -> str:
    """`program` found on the PATH of `env` (as subprocess looks it up), or as given."""
    if os.sep in program:
        return program
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(d or ".", program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(errno.ENOENT, f"{program} not found on PATH", program)


class Spawned:
    """A child on three pipes, started with os.posix_spawn: the part of subprocess.Popen
    the session uses. Our pipe ends are close-on-exec, so the child holds only its own
    and the descriptors in `pass_fds` (made inheritable just for the spawn)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int] = ()) -> None:
        child_in, self_in = os.pipe()
        self_out, child_out = os.pipe()
        self_err, child_err = os.pipe()
        try:
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            self.pid = os.posix_spawn(
                _which(argv[0], env), list(argv), dict(env),
                file_actions=[(os.POSIX_SPAWN_DUP2, child_in, 0), (os.POSIX_SPAWN_DUP2, child_out, 1),
                              (os.POSIX_SPAWN_DUP2, child_err, 2)],
            )
        except BaseException:
            for fd in (self_in, self_out, self_err):
                os.close(fd)
            raise
        finally:
            for fd in pass_fds:
                os.set_inheritable(fd, False)
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        self.stdin: IO[bytes] | None = open(self_in, "wb", buffering=0)
        self.stdout: IO[bytes] | None = open(self_out, "rb", buffering=0)
        self.stderr: IO[bytes] | None = open(self_err, "rb", buffering=0)
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            while True:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    break
                except InterruptedError:
                    continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self._signal(9)  # SIGKILL (the signal module's import is not needed for two numbers)

    def terminate(self) -> None:
        self._signal(15)  # SIGTERM


# ---------------------------------------------------------------- byte pumps


class Endpoint:
    """One side of a copy: a raw fd when there is one, else a Python binary stream."""

    def __init__(self, stream: IO[bytes] | None = None, fd: int | None = None) -> None:
        self.stream = stream
        self.fd = fd if fd is not None else _fileno(stream)

    def read(self, n: int) -> bytes:
        if self.fd is not None:
            return os.read(self.fd, n)
        assert self.stream is not None
        read1 = getattr(self.stream, "read1", None)
        return read1(n) if read1 else self.stream.read(n)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.fd is not None:
                n = os.write(self.fd, view)
            else:
                assert self.stream is not None
                n = self.stream.write(view) or len(view)
                self.stream.flush()
            view = view[n:]


def _fileno(stream: IO[bytes] | None) -> int | None:
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def copy(src: Endpoint, dst: Endpoint) -> None:
    """Copy until src ends; splice when both are fds (pipes), read/write otherwise."""
    if src.fd is not None and dst.fd is not None and hasattr(os, "splice"):
        try:
            while os.splice(src.fd, dst.fd, CHUNK):
                pass
            return
        except OSError as e:
            # EINVAL: one side is not a pipe (a file, a tty). Nothing was moved by the failed call.
            if e.errno != errno.EINVAL:
                raise
    while True:
        data = src.read(CHUNK)
        if not data:
            return
        dst.write(data)


# ---------------------------------------------------------------- hints on failure

# (pattern, ignore case, hint): compiled only when a transfer failed, so `re` stays off the fast path.
_HINTS: tuple[tuple[bytes, bool, str], ...] = (
    (
        rb"error: 401|HTTP 401|Authentication failed|terminal prompts disabled|could not read Username",
        False,
        "the server rejected the token (HTTP 401) for {repo}: is the public key registered with kid "
        "{kid}, is the org {org} right, and is this machine's clock correct? check with: codestore doctor",
    ),
    (
        rb"error: 403|HTTP 403",
        False,
        "the server refused {repo} (HTTP 403): the token's scopes ({scopes}) or a ref policy do not allow this",
    ),
    (
        rb"error: 404|HTTP 404|not found|does not appear to be a git repository",
        False,
        "{repo} was not found at {base}; check the name, or create it: codestore repo create {repo}",
    ),
    (
        rb"error: 30[0-9]|redirect",
        True,
        "the server answered with a redirect, which codestore never follows with a token; "
        "set CODESTORE_BASE_URL to the final URL",
    ),
    (
        rb"Could not resolve|Failed to connect|Couldn't connect|Connection refused|timed out|"
        rb"SSL|certificate|Connection reset|Empty reply|Recv failure|Send failure",
        False,
        "cannot reach {base}; check the network, and CODESTORE_BASE_URL if this is not Code Storage",
    ),
)


def hint_for(stderr_tail: bytes, expired: bool = False) -> str | None:
    """One line explaining a transport failure, from what git printed (None: git said enough).

    `expired`: the token had run out by the time the transport failed, so a 401 means
    exactly that, not a wrong key, org or clock.
    """
    import re  # only when a transfer failed

    for pattern, ignore_case, text in _HINTS:
        if re.search(pattern, stderr_tail, re.IGNORECASE if ignore_case else 0):
            if expired and text is _HINTS[0][2]:
                return expired_during_push("CODESTORE_TTL, at most 3600")
            # Beyond 401 (where git's own words mislead), a server that explained itself
            # on a `remote:` line has said more than a guess of ours could.
            if b"remote: " in stderr_tail and "HTTP 401" not in text:
                return None
            return text
    return None


class StderrTee:
    """Passes the transport's stderr through as it comes, keeping the tail to explain failures.

    But for git's last words on a transfer that failed at the HTTP level (`fatal: unable to
    access 'URL': REASON`): those are held, for `proxy` to fold into codestore's one line
    when it has a hint (git's line, then ours, was two lines saying one thing), or to pass
    on as they were when it has none.
    """

    KEEP = 16 * 1024
    HELD = b"fatal: unable to access '"

    def __init__(self, src: IO[bytes], dst: Endpoint) -> None:
        import threading

        self.src = Endpoint(src)
        self.dst = dst
        self.tail = b""
        self.held: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        partial = b""  # the start of a line that may be one to hold
        while True:
            try:
                data = self.src.read(65536)
            except OSError:
                data = b""
            if not data:
                if partial:  # git's last words without their newline: held, or passed, as a line
                    out, _ = self._sort(partial + b"\n")
                    self._pass(out)
                return
            self.tail = (self.tail + data)[-self.KEEP :]
            out, partial = self._sort(partial + data)
            self._pass(out)

    def _sort(self, data: bytes) -> tuple[bytes, bytes]:
        """(what passes now, the start of a line kept until it shows whether it is held)."""
        out: list[bytes] = []
        while (end := data.find(b"\n")) >= 0:
            line, data = data[: end + 1], data[end + 1 :]
            (self.held if line.startswith(self.HELD) else out).append(line)
        if data and not (data.startswith(self.HELD) or self.HELD.startswith(data)):
            out.append(data)  # progress and the like: at once
            data = b""
        return b"".join(out), data

    def _pass(self, data: bytes) -> None:
        if data:
            try:
                self.dst.write(data)
            except OSError:
                pass

    def reason(self) -> str:
        """What git's held lines said after the URL (curl's words), for codestore's line."""
        text = b"".join(self.held).decode("utf-8", "replace")
        words = [line.partition("': ")[2].strip() for line in text.splitlines()]
        return "; ".join(w for w in words if w)[:300]


# ---------------------------------------------------------------- the session


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def proxy(
    child: Child,
    decision: Decision,
    pending: bytes,
    git_in: Endpoint,
    git_out: Endpoint,
    git_err: Endpoint,
    hint_fields: Mapping[str, str],
    configured: Callable[[], None] = lambda: None,
    *,
    advertisement_only: bool = False,
    expires_at: int = 0,
    advertised: Callable[[bytes], None] | None = None,
    results: Callable[[LineReader, Callable[[bytes], None]], None] | None = None,
) -> int:
    """Replay what git said to the transport, swallow its answers, then join the two.

    `pending` is input git sent after the deciding command (normally nothing: git waits
    for the answer). `configured` is called once the transport has answered its first
    line: by then it has read all its configuration. With `advertisement_only`, only the
    answer to `list for-push` (up to its blank line) reaches git, and the transport is
    then told to end: the push commands get a transport of their own; `advertised` sees
    each of its lines on the way. `results`, for a push, reads the transport's answer to
    the push commands (passing it on to git) before the rest is copied as bytes (see
    pushwatch.py). `expires_at` is the token's expiry, to tell a token that ran out from
    one that was refused. Returns the transport's exit status, as git would see it.
    """
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    tee = StderrTee(child.stderr, git_err)
    tee.thread.start()
    child_in = Endpoint(child.stdin)
    child_out = Endpoint(child.stdout)
    # git always starts with `capabilities`; if it did not, we ask, to know when the
    # transport is past its configuration.
    lines = decision.replay or [(b"capabilities", None)]
    reader = LineReader(child_out.read)
    try:
        # The first answer proves the transport has read its configuration: only then is
        # the private configuration emptied, and only then does the transport get the
        # command that makes it start children (send-pack, pack-objects) that must find
        # it empty. Writing everything at once raced the command against the emptying.
        first, rest = lines[:1], lines[1:]
        child_in.write(first[0][0] + b"\n")
        _swallow(reader, first)
        configured()
        child_in.write(b"".join(line + b"\n" for line, _ in rest) + decision.command + b"\n" + pending)
        _swallow(reader, rest)
        if advertisement_only:
            while (line := _line(reader)) != b"":
                if advertised is not None:
                    advertised(line)
                git_out.write(line + b"\n")
            git_out.write(b"\n")
            child_in.write(b"\n")  # the end of the session, as git ends one (else it exits 1)
            connected = False
        else:
            if results is not None:
                results(reader, git_out.write)
            connected = True
    except (BrokenPipeError, _TransportEnded):
        connected = False
    except ProtocolError:
        child.kill()
        child.wait()
        raise
    finally:
        configured()
    if connected:
        import threading

        upstream = threading.Thread(target=_upstream, args=(git_in, child), daemon=True)
        upstream.start()
        try:
            leftover = reader.take_buffer()
            if leftover:
                git_out.write(leftover)
            copy(child_out, git_out)
        except BrokenPipeError:
            # git went away: the transport has nobody to talk to either.
            child.terminate()
    else:
        try:
            child.stdin.close()
        except OSError:
            pass
    status = _exit_status(child.wait())
    tee.thread.join(timeout=5)
    hint = hint_for(tee.tail, expired=bool(expires_at) and time.time() >= expires_at) if status != 0 else None
    reason = tee.reason()
    if hint:
        said = f"codestore: {hint.format(**hint_fields)}{f'; git: {reason}' if reason else ''}\n".encode()
    else:
        said = b"".join(tee.held)  # git's own words, as they were
    if said:
        try:
            git_err.write(said)
        except OSError:
            pass
    return status


class _TransportEnded(Exception):
    """The transport closed its output before answering the replayed lines."""


def _swallow(reader: LineReader, replay: Sequence[tuple[bytes, bytes | None]]) -> None:
    """Read the transport's answers to the replayed lines (what follows stays in `reader`)."""
    for line, ours in replay:
        if ours is None:
            offered: set[bytes] = set()
            while (cap := _line(reader)) != b"":
                offered.add(cap.lstrip(b"*"))
            missing = [c.decode() for c in CAPABILITIES if c not in offered]
            if missing:
                raise ProtocolError(
                    f"this git's HTTPS transport lacks capabilities codestore announced ({', '.join(missing)}); "
                    "please report it with the output of: git --version"
                )
        else:
            theirs = _line(reader)
            # An option a newer transport takes but we called unsupported only goes unused,
            # as git would do with an older transport; the reverse would silently drop a
            # setting git believes is in force (a depth, a filter), so it stops here.
            if theirs != ours and not (ours == b"unsupported" and theirs == b"ok"):
                name = line.split(b" ")[1].decode("ascii", "replace")
                raise ProtocolError(
                    f"git's HTTPS transport answered option {name!r} differently than codestore did; please report it"
                )


def _line(reader: LineReader) -> bytes:
    line = reader.readline()
    if line is None:
        raise _TransportEnded
    return line


def _upstream(git_in: Endpoint, child: Child) -> None:
    assert child.stdin is not None
    try:
        copy(git_in, Endpoint(child.stdin))
    except OSError:
        pass  # the transport ended first; its exit status tells git why
    finally:
        try:
            child.stdin.close()
        except OSError:
            pass
