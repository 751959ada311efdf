"""Sandboxes on this machine: a root-built "image" and non-root users that run it.

A sandbox image is built as root and run as another user. Here the image is a
system-wide install.sh into a world-readable temporary directory (the same code path
as the root default, /opt/codestore and /usr/local/bin, with the locations moved so
this machine's own are never touched), git's system config is a temporary file named
by GIT_CONFIG_SYSTEM, and each sandbox is a non-root user (created with useradd when
the tests run as root; otherwise the tests' own user, which is already not root) with
its own HOME and a clean environment.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORK_SH = ROOT / "examples" / "sandbox" / "work.sh"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


USER_PREFIX = "codestore-sbx-"  # every sandbox user's name starts so (conftest removes the ones a run made)


def sandbox_users() -> set[str]:
    """The sandbox users this machine has now."""
    return {entry.pw_name for entry in pwd.getpwall() if entry.pw_name.startswith(USER_PREFIX)}


def remove_users(names: set[str]) -> None:
    """userdel each (as root); one still running a process is left, as before this run."""
    for name in sorted(names):
        subprocess.run(["userdel", name], capture_output=True, check=False)


def sandbox_user(name: str) -> User:
    """A non-root user for a sandbox (USER_PREFIX + a letter); created (once, idempotently) when we are root."""
    assert name.startswith(USER_PREFIX), name
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return User(me.pw_name, me.pw_uid, me.pw_gid)
    # Test processes running in parallel (pytest -n) may ask for the same user at once:
    # one creates it, under a lock, and the others find it.
    with open(os.path.join(tempfile.gettempdir(), "codestore-tests-useradd.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
                           check=True, capture_output=True, text=True)
            entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


def give(path: Path, user: User, mode: int) -> Path:
    """Hand a file or directory to the sandbox user, as a sandbox's own files would be."""
    if os.geteuid() == 0:
        os.chown(path, user.uid, user.gid)
    path.chmod(mode)
    return path


def make_home(base: Path, user: User, name: str) -> Path:
    home = base / name
    home.mkdir()
    return give(home, user, 0o700)


def as_user(user: User, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None,
            timeout: float = 300, start: bool = False) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run a program as the sandbox user (a fresh session, so a kill takes its children)."""
    root = os.geteuid() == 0
    uid, gid = (user.uid, user.gid) if root else (None, None)
    groups: list[int] | None = [] if root else None
    if start:
        return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True, user=uid, group=gid, extra_groups=groups)
    return subprocess.run(list(args), capture_output=True, timeout=timeout, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                          text=True, start_new_session=True, user=uid, group=gid, extra_groups=groups)


@dataclass(frozen=True)
class Image:
    """What `install.sh` built as root: the programs' directory and the install log."""

    root: Path
    bin_dir: Path
    prefix: Path
    install_output: str


def sandbox_env(home: Path, image: Image, **extra: str) -> dict[str, str]:
    """What a fresh sandbox has: PATH, HOME, no codestore or git settings of its own."""
    return {
        "PATH": f"{image.bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
        **extra,
    }


@pytest.fixture(scope="session")
def world_readable_tmp() -> Iterator[Path]:
    """A temp dir other users can traverse (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="codestore-image-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def image(world_readable_tmp: Path) -> Image:
    """install.sh --system, run once: the sandbox image every recipe test runs in."""
    root = world_readable_tmp / "image"
    prefix, bin_dir = root / "opt" / "codestore", root / "usr" / "local" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODESTORE_", "GIT_", "XDG_"))}
    # A system python3 first on PATH, as an image has (install.sh refuses one under /root).
    env.update(PATH="/usr/bin:/bin:" + os.environ["PATH"], GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_SYSTEM=str(world_readable_tmp / "unused-gitconfig"))
    proc = subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--system", "--prefix", str(prefix), "--bin-dir", str(bin_dir)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # What every recipe's image does after install.sh: the in-sandbox script on PATH.
    shutil.copy(WORK_SH, bin_dir / "codestore-work")
    (bin_dir / "codestore-work").chmod(0o755)
    return Image(root, bin_dir, prefix, proc.stdout)


@pytest.fixture
def sandbox_base(world_readable_tmp: Path, tmp_path: Path) -> Iterator[Path]:
    """A per-test directory under the world-readable one, for homes and git config."""
    base = Path(tempfile.mkdtemp(dir=world_readable_tmp, prefix="test-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
