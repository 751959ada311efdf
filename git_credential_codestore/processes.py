"""Child processes: starting a dev server and reading its URL, and stopping a child.

Used by `codestore demo` and the tests (and fit for any script): one place that knows the
dev server's start-up contract, its first stdout line
`codestore dev-server: serving URL (...)`, flushed once the socket listens.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence

from .errors import CodestoreError

CODESTORE = (sys.executable, "-m", "git_credential_codestore.cli")


def start_dev_server(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, program: Sequence[str] = CODESTORE
) -> tuple[subprocess.Popen[str], str]:
    """Run `codestore dev-server ARGS` (pass `--port 0`); returns (process, URL) once it serves."""
    proc = subprocess.Popen(
        [*program, "dev-server", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=dict(env) if env is not None else None,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if "serving " not in line:
        proc.kill()
        err = proc.stderr.read()
        stop(proc)
        raise CodestoreError(f"the dev server did not start: {(err or line).strip()[-300:]}")
    return proc, line.split("serving ", 1)[1].split()[0]


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate (kill after `timeout` s), reap, and close our ends of its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
