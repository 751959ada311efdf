"""CODESTORE_TRACE: one line per decision, for when a clone fails and nobody knows why.

    CODESTORE_TRACE=1 (or true, yes, on)   trace to stderr
    CODESTORE_TRACE=/abs/path/trace.log    append to that file (created 0600)
    unset, "", 0, false, no, off           off: the only cost is this env lookup

When CODESTORE_TRACE is unset, `CODESTORE_DEBUG` and then the official helper's
`PIERRE_DEBUG` are read the same way, so an image moving from `git-credential-code-storage`
keeps its switch. The values
are read as git reads a trace key such as GIT_TRACE (`trace.c`): false words turn it off,
true words mean stderr, an absolute path means a file; anything else is a mistake,
reported in one line, and tracing stays off.

Lines name files, hosts, repositories, scopes, sources, key ids and reasons; never a
token, a grant or a key. Callers build messages from names alone, and every line also
goes through `errors.redact` before it is written.

This module imports nothing but `os` and vocab (loaded by then anyway) at load time: it is
read on every git request.
"""

from __future__ import annotations

import os

from .vocab import TRUE_WORDS, is_off

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping

VARIABLES = ("CODESTORE_TRACE", "CODESTORE_DEBUG", "PIERRE_DEBUG")  # first set one wins


def target(env: Mapping[str, str] | None = None) -> str | None:
    """Where trace lines go: "" for stderr, a path, or None when tracing is off."""
    env = os.environ if env is None else env
    value = next((v for v in (env.get(name, "").strip() for name in VARIABLES) if v), "")
    if is_off(value):
        return None
    if value.lower() in TRUE_WORDS:
        return ""
    if os.path.isabs(value):
        return value
    import sys

    if value not in _said:  # said once a process, not at every trace point
        _said.add(value)
        print(
            f"codestore: {next(n for n in VARIABLES if env.get(n, '').strip())}={value!r} is neither 1 nor an absolute path; tracing is off "
            "(set CODESTORE_TRACE=1 for stderr, or an absolute file path)",
            file=sys.stderr,
        )
    return None


def say(what: str, message: str, env: Mapping[str, str] | None = None) -> None:
    """Write `codestore[pid] WHAT: MESSAGE` when tracing is on; do nothing otherwise."""
    where = target(env)
    if where is None:
        return
    import sys
    import time

    from .errors import for_terminal, redact

    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not prog.startswith(("codestore", "git-credential-codestore", "git-remote-codestore")):
        prog = "codestore"  # python -m, tests
    # Hosts and paths come from URLs others chose: escaped, as every error line is.
    line = f"{stamp} {prog}[{os.getpid()}] {what}: {for_terminal(redact(' '.join(message.split())))}\n"
    if not where:
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    try:
        from .files import open_append

        fd = open_append(where)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError as e:
        # Tracing never breaks the command (a full disk, /dev/full, a directory): said once,
        # then this process traces to stderr.
        if where not in _said:
            _said.add(where)
            sys.stderr.write(f"codestore: cannot write the trace file {where} ({e.strerror}); tracing to stderr\n")
        sys.stderr.write(line)


_said: set[str] = set()  # trace settings this process could not use, said once
