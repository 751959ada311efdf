"""Run git's own HTTPS transport with a token it finds only in its environment.

`git remote-https` does the real work. It gets the token as an `http.extraHeader`
through GIT_CONFIG_COUNT/KEY/VALUE in its environment: never argv (world-readable in
/proc), never a URL (GIT_TRACE prints those), never a config file. The same entries turn
off redirects (the header would follow them to another host) and every credential helper
(none may see or store the token), and prompts are off so a headless sandbox never hangs.

After the replay of what git already said, bytes pass both ways untouched: with
os.splice between pipes, so a large pack never crosses Python's memory.
"""

from __future__ import annotations

import binascii
import errno
import os
from collections.abc import Mapping, Sequence

from git_credential_codestore.errors import ConfigError
from git_credential_codestore.secrets import Token

from .protocol import CAPABILITIES, Decision, LineReader, ProtocolError

# This module is inside the helpers' fast path (fastpath.py): threading and re are
# imported only once a transfer starts or fails, typing only by the type checker, and the
# transport is started without subprocess (whose import brings re, through locale).
TYPE_CHECKING = False
if TYPE_CHECKING:
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


def child_env(env: Mapping[str, str], token: Token) -> dict[str, str]:
    """`env` plus the token header and the settings that keep it where it belongs."""
    out = dict(env)
    raw = out.get("GIT_CONFIG_COUNT", "").strip() or "0"
    if not raw.isdigit():
        raise ConfigError(f"GIT_CONFIG_COUNT={raw!r} is not a number; fix or unset it")
    count = int(raw)
    basic = binascii.b2a_base64(f"t:{token.reveal()}".encode(), newline=False).decode("ascii")
    out[f"GIT_CONFIG_KEY_{count}"] = "http.extraHeader"
    out[f"GIT_CONFIG_VALUE_{count}"] = f"Authorization: Basic {basic}"
    out["GIT_CONFIG_COUNT"] = str(count + 1)
    # The guards go last of all config (GIT_CONFIG_PARAMETERS is read after GIT_CONFIG_COUNT),
    # so not even `git -c http.followRedirects=true` can undo them for this process:
    # the header would follow a redirect to another host; an empty helper value empties
    # the helper list, so nothing is asked and nothing could store a token.
    guards = " ".join(f"{_sq(k)}={_sq(v)}" for k, v in (("credential.helper", ""), ("http.followRedirects", "false")))
    params = out.get("GIT_CONFIG_PARAMETERS", "").strip()
    out["GIT_CONFIG_PARAMETERS"] = f"{params} {guards}" if params else guards
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


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> Child:
    try:
        if hasattr(os, "posix_spawn"):
            return Spawned(argv, env)
        import subprocess

        return subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
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
    the session uses. Our pipe ends are close-on-exec, so the child holds only its own."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        child_in, self_in = os.pipe()
        self_out, child_out = os.pipe()
        self_err, child_err = os.pipe()
        try:
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


def hint_for(stderr_tail: bytes) -> str | None:
    """One line explaining a transport failure, from what git printed (None: git said enough)."""
    import re  # only when a transfer failed

    for pattern, ignore_case, text in _HINTS:
        if re.search(pattern, stderr_tail, re.IGNORECASE if ignore_case else 0):
            # Beyond 401 (where git's own words mislead), a server that explained itself
            # on a `remote:` line has said more than a guess of ours could.
            if b"remote: " in stderr_tail and "HTTP 401" not in text:
                return None
            return text
    return None


class StderrTee:
    """Passes the transport's stderr through as it comes, keeping the tail to explain failures."""

    KEEP = 16 * 1024

    def __init__(self, src: IO[bytes], dst: Endpoint) -> None:
        import threading

        self.src = Endpoint(src)
        self.dst = dst
        self.tail = b""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                data = self.src.read(65536)
            except OSError:
                return
            if not data:
                return
            self.tail = (self.tail + data)[-self.KEEP :]
            try:
                self.dst.write(data)
            except OSError:
                pass


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
) -> int:
    """Replay what git said to the transport, swallow its answers, then join the two.

    `pending` is input git sent after the deciding command (normally nothing: git waits
    for the answer). Returns the transport's exit status, as git would see it.
    """
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    tee = StderrTee(child.stderr, git_err)
    tee.thread.start()
    child_in = Endpoint(child.stdin)
    child_out = Endpoint(child.stdout)
    replay = b"".join(line + b"\n" for line, _ in decision.replay) + decision.command + b"\n" + pending
    try:
        child_in.write(replay)
        leftover = _swallow(LineReader(child_out.read), decision)
    except (BrokenPipeError, _TransportEnded):
        leftover = None
    except ProtocolError:
        child.kill()
        child.wait()
        raise
    if leftover is not None:
        import threading

        upstream = threading.Thread(target=_upstream, args=(git_in, child), daemon=True)
        upstream.start()
        try:
            if leftover:
                git_out.write(leftover)
            copy(child_out, git_out)
        except BrokenPipeError:
            # git went away: the transport has nobody to talk to either.
            child.terminate()
    else:
        child.stdin.close()
    status = _exit_status(child.wait())
    tee.thread.join(timeout=5)
    if status != 0:
        hint = hint_for(tee.tail)
        if hint:
            try:
                git_err.write(f"codestore: {hint.format(**hint_fields)}\n".encode())
            except OSError:
                pass
    return status


class _TransportEnded(Exception):
    """The transport closed its output before answering the replayed lines."""


def _swallow(reader: LineReader, decision: Decision) -> bytes:
    """Read the transport's answers to the replayed lines; return what came after them."""
    for line, ours in decision.replay:
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
    return reader.take_buffer()


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
