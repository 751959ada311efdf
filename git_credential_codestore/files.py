"""Files codestore owns: written atomically, with the mode set at creation.

Every file codestore replaces (the config file, key files, the grant store, setup's
state, the dev server's hook and certificates) goes through `write_atomic`: a reader
sees the old file or the new one, never half of either, and a secret is never readable
by others even for a moment (the mode is set when the file is created, not after).

Files codestore is pointed at (the configuration, keys, grants) are read through
`read_bounded`: a path from the environment may name /dev/zero or a file that never
ends, so every such read stops at a limit and says which file was too big.
"""

from __future__ import annotations

import os

from .errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from typing import BinaryIO


def write_atomic(
    path: str,
    data: str | bytes,
    mode: int = 0o600,
    *,
    fsync: bool = False,
    check: Callable[[str], object] | None = None,
) -> str:
    """Write `data` to `path` through a temporary file of this call's own and a rename;
    returns `path`.

    `fsync`: make it durable before the rename (state that must survive a crash).
    `check(tmp_path)`: validate the new file before it replaces the old one; if it
    raises, the old file is left untouched and the temporary one removed.
    Each call writes its own temporary file (O_EXCL, a random name beside `path`): two
    processes writing at once (two `config set`, helpers refreshing a cache) each
    replace the file whole, never truncate or remove the other's temporary file. One
    that a killed writer left behind is removed by a later write (_sweep).
    """
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            # A rename would replace a device node (/dev/null as CODESTORE_CONFIG), a pipe or a socket.
            raise ConfigError(f"{path} is not a regular file; refusing to replace it: point the setting at a file")
    _sweep(path)
    while True:
        tmp = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask narrows O_CREAT's
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


STALE_TMP = 60.0  # seconds: no write_atomic takes this long between its open and its rename


def _sweep(path: str) -> None:
    """Remove the temporary files of `path` that writers killed between their open and
    their rename left behind (a private key's, a grant's: a SIGKILL left a second copy).
    Each is named after its writer's pid: one whose writer is gone and that is older than
    STALE_TMP is nobody's (the age also covers a writer in another pid namespace, alive
    and invisible from here). Not on Windows, where os.kill(pid, 0) would end the process."""
    if os.name == "nt":
        return
    import time

    directory, base = os.path.split(path)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return
    prefix, now = base + ".", time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        digits, dash, tag = name[len(prefix):-len(".tmp")].partition("-")
        if not (dash and digits.isascii() and digits.isdigit() and len(tag) == 8):
            continue
        pid = int(digits)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # its writer lives
        except ProcessLookupError:
            pass
        except (OverflowError, OSError):
            continue  # another user's live process (EPERM), or not a pid at all
        stale = os.path.join(directory, name)
        try:
            if now - os.lstat(stale).st_mtime > STALE_TMP:
                os.unlink(stale)
        except OSError:
            pass


MAX_FILE = 1 << 20  # a config file, a PEM key, a grant: all a few kilobytes at most


def read_bounded(path: str, what: str, limit: int = MAX_FILE) -> bytes:
    """The whole file at `path` if it holds at most `limit` bytes; ConfigError if more.

    FileNotFoundError passes through (callers decide whether a missing file is normal);
    other OS errors too, for the caller to word.
    """
    fd = open_nonblocking(path)
    try:
        return read_fd_bounded(fd, path, what, limit)
    finally:
        os.close(fd)


STREAM_WAIT = 5.0  # seconds a pipe or device named as a file may take to give all it has


def open_nonblocking(path: str) -> int:
    """`path` opened for reading without waiting: a named pipe with no writer would block open(2) forever."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def open_regular(path: str, what: str) -> BinaryIO:
    """`path` opened for reading when it is a regular file, of any size (an old store the
    caller reads whole); ConfigError naming `what` for anything else, not waited on (a named
    pipe would block open(2) for ever). FileNotFoundError passes through."""
    import stat

    fd = open_nonblocking(path)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{what} {path} is not a regular file; move it away, or replace it with the file")
    return os.fdopen(fd, "rb")


def not_a_file(path: str) -> bool:
    """Whether `path` is there and is not a regular file (a pipe, a device, a directory): for a
    path handed to a library that opens it itself (a TLS key, a PKCS#11 module), where a
    named pipe would hold the open for ever. False for a regular file, and for a path that
    cannot be looked at (missing: the library says what is wrong with it)."""
    import stat

    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def ca_context(path: str | None, what: str) -> ssl.SSLContext:
    """A client TLS context trusting the PEM certificates in `path` (None: the system's CAs).
    The file is read as every file codestore is pointed at is (read_bounded): OpenSSL's own
    cafile= would wait on a named pipe's writer for ever. Raises what reading and loading it
    raise (OSError, ConfigError, UnicodeDecodeError, ssl.SSLError), and ValueError("empty")
    for a file with no text: cadata="" would quietly mean the system's CAs."""
    import ssl

    if not path:
        return ssl.create_default_context()
    pem = read_bounded(path, what).decode("ascii")
    if not pem.strip():
        raise ValueError("empty")
    return ssl.create_default_context(cadata=pem)


def open_append(path: str, mode: int = 0o600) -> int:
    """`path` opened to append lines (a log, a trail, a trace), created `mode`, without waiting:
    a named pipe nobody reads fails here (ENXIO) instead of holding the process forever."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, mode)


def read_fd_bounded(fd: int, path: str, what: str, limit: int = MAX_FILE) -> bytes:
    """`read_bounded` for `fd` (from open_nonblocking), read from where it stands. A pipe
    (process substitution, a FIFO) is read until its writer closes it, for STREAM_WAIT at most."""
    import stat
    import time

    deadline = None if stat.S_ISREG(os.fstat(fd).st_mode) else time.monotonic() + STREAM_WAIT
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        try:
            chunk = os.read(fd, limit + 1 - size)
        except BlockingIOError:
            import select

            left = (deadline or 0) - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ConfigError(f"nothing more came from {what} {path} within {STREAM_WAIT:g} s; "
                                  "point it at a file (a named pipe needs a writer that closes it)") from None
            continue
        except OSError as e:  # a directory (EISDIR): read(2) names no file; the caller's line should
            if e.filename is None:
                e.filename = path
            raise
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; point it at the right file")
    return b"".join(chunks)
