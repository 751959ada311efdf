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
    from collections.abc import Callable
    from typing import BinaryIO


def write_atomic(
    path: str,
    data: str | bytes,
    mode: int = 0o600,
    *,
    fsync: bool = False,
    check: Callable[[str], object] | None = None,
    concurrent: bool = False,
) -> str:
    """Write `data` to `path` through `path.tmp` and a rename; returns `path`.

    `fsync`: make it durable before the rename (state that must survive a crash).
    `check(tmp_path)`: validate the new file before it replaces the old one; if it
    raises, the old file is left untouched and the temporary one removed.
    `concurrent`: several processes may write the same file at once (a cache the git
    helpers refresh), so each writes its own temporary file.
    """
    tmp = f"{path}.{os.getpid()}.tmp" if concurrent else path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # a leftover tmp keeps its old mode; the umask narrows O_CREAT's
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


MAX_FILE = 1 << 20  # a config file, a PEM key, a grant: all a few kilobytes at most


def read_bounded(path: str, what: str, limit: int = MAX_FILE) -> bytes:
    """The whole file at `path` if it holds at most `limit` bytes; ConfigError if more.

    FileNotFoundError passes through (callers decide whether a missing file is normal);
    other OS errors too, for the caller to word.
    """
    with open(path, "rb") as f:
        return read_open_bounded(f, path, what, limit)


def read_open_bounded(f: BinaryIO, path: str, what: str, limit: int = MAX_FILE) -> bytes:
    """`read_bounded` for a file already open (as `path`), read from where it stands."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; point it at the right file")
    return data
