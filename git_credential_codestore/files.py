"""Reading the small files codestore is pointed at (configuration, keys, grants), bounded.

A path comes from the environment or a config file, so it may name /dev/zero, a FIFO
that never ends, or a multi-gigabyte file: every such read stops at a limit and says
which file was too big. Light on purpose: the helpers read configuration on every request.
"""

from __future__ import annotations

import os

from .errors import ConfigError

MAX_FILE = 1 << 20  # a config file, a PEM key, a grant: all a few kilobytes at most


def read_bounded(path: str, what: str, limit: int = MAX_FILE) -> bytes:
    """The whole file at `path` if it holds at most `limit` bytes; ConfigError if more.

    FileNotFoundError passes through (callers decide whether a missing file is normal);
    other OS errors too, for the caller to word.
    """
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; point it at the right file")
    return data
