"""Run git from one place: argument lists only, exact exit codes, redacted errors."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from .errors import GitError, redact


def run(
    args: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    ok: Sequence[int] = (0,),
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `git ARGS`; exit codes outside `ok` raise GitError with git's own (redacted) words."""
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=dict(env) if env is not None else None,
            input=input,
            capture_output=True,
            text=True,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH; install git 2.39 or newer") from None
    if proc.returncode not in ok:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("codestore: ")  # our helper's line
        raise GitError(f"git {args[0]} failed (exit {proc.returncode}): {redact(detail)}")
    return proc


def output(args: Sequence[str], *, env: Mapping[str, str] | None = None) -> bytes:
    """`git ARGS`'s stdout as bytes (file contents, patches in any encoding); GitError as `run`."""
    try:
        proc = subprocess.run(["git", *args], env=dict(env) if env is not None else None, capture_output=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH; install git 2.39 or newer") from None
    if proc.returncode != 0:
        detail = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        raise GitError(f"git {args[0]} failed (exit {proc.returncode}): {redact(detail)}")
    return proc.stdout


def log_records(args: Sequence[str], fields: Sequence[str], *, env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """`git ARGS`, a `git log` (its word in ARGS, after any -C or --git-dir), each commit as {field: value}.

    `fields` are format placeholders (`%H` first: every record is checked to begin with a
    commit id). The fields and the records are NUL-separated (`-z`), the one byte a commit's
    text cannot hold: with other separators (0x1e, 0x1f) a subject or message that held
    them made up commits of its own (a review that listed a commit nobody pushed)."""
    assert fields[0] == "%H"
    at = list(args).index("log") + 1
    out = run([*args[:at], "-z", f"--format={'%x00'.join(fields)}", *args[at:]], env=env).stdout
    parts = out.split("\0")
    if parts and parts[-1] in ("", "\n"):
        parts.pop()
    n = len(fields)
    if len(parts) % n:
        raise GitError(f"git log printed records that are not {n} fields each; is this git 2.39 or newer?")
    records = []
    for at in range(0, len(parts), n):
        commit = parts[at].lstrip("\n")  # the newline git log may put before a record
        if len(commit) not in (40, 64) or not all(c in "0123456789abcdef" for c in commit):
            raise GitError("git log printed a record that does not begin with a commit id")
        records.append(dict(zip(fields, [commit, *parts[at + 1:at + n]], strict=True)))
    return records


def config_get_all(key: str, *, scope: str = "--global", env: Mapping[str, str] | None = None) -> list[str]:
    # `git config --get-all` exits 1 when the key is unset: that is an answer, not an error.
    proc = run(["config", scope, "--get-all", key], env=env, ok=(0, 1))
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def version(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    out = run(["--version"], env=env).stdout.split()
    parts = (out[2] if len(out) > 2 else "0").split(".")
    nums = [int(p) if p.isdigit() else 0 for p in parts[:3]]
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]
