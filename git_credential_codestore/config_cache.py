"""The parsed config file, kept so the git helpers need not import a TOML parser.

tomllib's import is most of what reading `config.toml` costs (~13 ms, more than the rest
of a credential request), and the file changes rarely. After tomllib parses it, the
result is written with `marshal` (a builtin) to the user's cache directory, keyed by the
file's path and its identity (inode, size, modification and change times). A later
request whose config file has the same identity reads that instead; any other file, or
any doubt about the cache, goes back to tomllib. tomllib stays the one parser.

Threat: a cache someone else can write would let them change the configuration (the
base URL, so a token would go to their server). A cache is used only when it is owned
by this user and writable by nobody else, and it lives in this user's cache directory.
"""

from __future__ import annotations

import marshal
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

FORMAT = 1  # bump when the cached shape changes


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cache_path(config_path: str, env: Mapping[str, str]) -> str:
    """Where the parsed copy lives: one file per user, holding the last config file read.

    One file, not one per config path, so configs in temporary places (a demo, a test,
    CODESTORE_CONFIG) leave nothing behind that grows; its key names the path it holds.
    """
    from .config import user_dir

    return os.path.join(user_dir("cache", env), "config.marshal")


def read(config_path: str, st: os.stat_result, env: Mapping[str, str]) -> dict[str, object] | None:
    """The parsed file, if the cache holds this very file; None otherwise."""
    value = load(cache_path(config_path, env), (FORMAT, os.path.abspath(config_path), _identity(st)))
    return value if isinstance(value, dict) else None


def write(config_path: str, st: os.stat_result, parsed: Mapping[str, object], env: Mapping[str, str]) -> None:
    """Keep `parsed` for the next request; a cache that cannot be written is no error."""
    store(cache_path(config_path, env), (FORMAT, os.path.abspath(config_path), _identity(st)), dict(parsed))


def load(path: str, key: object) -> object:
    """The value stored under `key` at `path` by `store`; None when absent, stale or not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))  # a pipe: not waited on
    except OSError:
        return None
    try:
        cst = os.fstat(fd)
        if not stat.S_ISREG(cst.st_mode) or cst.st_mode & 0o022 or (hasattr(os, "geteuid") and cst.st_uid != os.geteuid()):
            return None  # not a file, or another user could have written it: not a source of configuration
        with os.fdopen(fd, "rb") as f:
            fd = -1
            entry = marshal.loads(f.read(1 << 20))
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == key:
        return entry[1]
    return None


def store(path: str, key: object, value: object) -> None:
    """Write (key, value) with marshal, atomically, 0600; failures are silent (it is a cache)."""
    try:
        data = marshal.dumps((key, value))  # type: ignore[arg-type]  # marshal itself checks (ValueError)
    except ValueError:
        return  # a value marshal cannot hold (a TOML date): it is computed each time
    from .errors import ConfigError
    from .files import write_atomic

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, data, 0o600)
    except (OSError, ConfigError):  # ConfigError: something not a file is in its place, and is left there
        pass
