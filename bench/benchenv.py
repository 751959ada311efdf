"""What every benchmark sets up the same way: a hermetic environment and the org's key file.

The benchmarks run from `bench/` (`python bench/NAME.py`), so this module is importable
as `benchenv`. Nothing here is measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from git_credential_codestore import keys
from git_credential_codestore.tokens import PrivateKey


def hermetic_env(home: str, gitconfig: str, *, path: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """git and codestore confined to `home`: its own git config, XDG dirs, no prompt, no keychain.

    `path` goes before the caller's PATH; `extra` adds or overrides variables.
    """
    return {
        "PATH": os.pathsep.join((*path, os.environ.get("PATH", "/usr/bin:/bin"))),
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_DATA_HOME": os.path.join(home, ".local/share"),
        "XDG_STATE_HOME": os.path.join(home, ".local/state"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "GIT_CONFIG_GLOBAL": gitconfig,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "Bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
        # keyring's own choice where no keychain works (as on this machine), pinned so a
        # benchmark never writes into a developer's real keychain.
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        **extra,
    }


def write_key(path: str, key: PrivateKey | None = None) -> PrivateKey:
    """A new EC key (or `key`) written to `path` as the 0600 PEM file the agent and CLI read."""
    key = keys.generate("ec") if key is None else key
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(keys.private_pem(key).reveal())
    return key
