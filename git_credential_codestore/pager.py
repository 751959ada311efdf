"""Show long output through a pager, by git's conventions.

The pager is GIT_PAGER, else git's `core.pager`, else PAGER, else `less`; `cat` or an
empty value means none. Output goes straight to stdout when it is not a terminal (a
pipe, a file, a test). Like git, LESS defaults to FRX and LV to -c, and the command
is run by the shell, since pager settings are shell snippets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def pager_command(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if "GIT_PAGER" in env:
        cmd = env["GIT_PAGER"]
    else:
        from . import git

        proc = git.run(["config", "--get", "core.pager"], env=env, ok=(0, 1))
        cmd = proc.stdout.strip() if proc.returncode == 0 else env.get("PAGER", "less")
    cmd = cmd.strip()
    return None if cmd in ("", "cat") else cmd


def page(text: str, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    cmd = pager_command(env) if sys.stdout.isatty() else None
    if cmd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    child_env = dict(env)
    child_env.setdefault("LESS", "FRX")
    child_env.setdefault("LV", "-c")
    try:
        proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.PIPE, env=child_env)  # noqa: S602 - git runs pagers the same way
    except OSError:
        sys.stdout.write(text)
        return
    assert proc.stdin is not None
    try:
        proc.stdin.write(text.encode("utf-8", "replace"))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the reader quit early: fine, as with git
    proc.wait()
