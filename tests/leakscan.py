"""Scanners for token and key material: in files, in text, in every process's argv and environment."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# `t:eyJ` base64-encoded, as it appears in an Authorization: Basic header.
BASIC_T_JWT = base64.b64encode(b"t:eyJ").decode()[:6]


def key_needles(pem: str) -> list[str]:
    """Distinctive lines of a PEM private key body."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----") and len(line) > 20]


def secrets_in_text(text: str, needles: Iterable[str] = ()) -> list[str]:
    found = JWT_SHAPE.findall(text)
    if BASIC_T_JWT in text:
        found.append("Basic t:<jwt>")
    found += [n for n in needles if n and n in text]
    return found


def files_with_secrets(root: Path, needles: Iterable[str] = (), skip: Iterable[Path] = ()) -> dict[str, list[str]]:
    needles, skip = list(needles), {p.resolve() for p in skip}
    hits: dict[str, list[str]] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.resolve() in skip or path.is_symlink():
                continue
            try:
                text = path.read_bytes().decode("latin-1")
            except OSError:
                continue
            found = secrets_in_text(text, needles)
            if found:
                hits[str(path)] = found
    return hits


def _descendants(root: int) -> list[int]:
    """Every live process below `root` (by parent pid), found in one pass over /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ProcSampler:
    """Reads /proc/PID/cmdline and /proc/PID/environ of every process the test starts
    (git, the helpers, the transports and their children), over and over, while it runs.
    Other processes on the machine (other test runs) are none of this test's business."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.samples = 0
        self.environs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in _descendants(me):
                for part in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{part}", "rb") as f:
                            text = f.read().decode("latin-1").replace("\0", " ")
                    except OSError:
                        continue
                    self.environs += part == "environ"
                    if secrets_in_text(text):
                        self.hits.append(f"{pid}/{part}: {text}")
            self.samples += 1

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


ArgvSampler = ProcSampler


def run_git_traced(
    steps: Sequence[tuple[list[str], Path | None]], trace: Path, **extra_env: str
) -> tuple[list[str], ProcSampler]:
    """Run git steps with GIT_TRACE, GIT_TRACE_CURL and GIT_TRACE_PACKET written under
    `trace`, while sampling every process's argv and environment. Returns each step's output and the
    sampler; a failing step fails the test."""
    trace.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        GIT_TRACE=str(trace / "trace"),
        GIT_TRACE_CURL=str(trace / "curl"),
        GIT_TRACE_PACKET=str(trace / "packet"),
        **extra_env,
    )
    outputs = []
    with ProcSampler() as sampler:
        for args, cwd in steps:
            proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stdout + proc.stderr)
    return outputs, sampler
