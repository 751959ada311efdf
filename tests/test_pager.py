"""Long output (codestore review) is paged by git's rules, and only on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

SHOW = "from git_credential_codestore import pager; pager.page('the review\\n')"


def run_on(terminal: bool, env: dict[str, str]) -> str:
    """Run pager.page in a child whose stdout is a pty (a terminal) or a pipe; return what reached stdout."""
    if not terminal:
        return subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True).stdout
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", SHOW], env=env, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=30)
        assert proc.returncode == 0, proc.stderr
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("variable", ["GIT_PAGER", "PAGER"])
def test_on_a_terminal_the_configured_pager_gets_the_text(tmp_path: Path, variable: str) -> None:
    seen = tmp_path / "paged"
    env = dict(os.environ, **{variable: f"cat > {seen}"})
    assert "the review" not in run_on(True, env)
    assert seen.read_text() == "the review\n"


def test_git_pager_wins_over_core_pager_and_pager(tmp_path: Path) -> None:
    subprocess.run(["git", "config", "--global", "core.pager", f"cat > {tmp_path / 'core'}"], check=True)
    env = dict(os.environ, GIT_PAGER=f"cat > {tmp_path / 'git'}", PAGER=f"cat > {tmp_path / 'pager'}")
    run_on(True, env)
    assert (tmp_path / "git").exists() and not (tmp_path / "core").exists() and not (tmp_path / "pager").exists()
    run_on(True, {k: v for k, v in env.items() if k != "GIT_PAGER"})
    assert (tmp_path / "core").exists() and not (tmp_path / "pager").exists()


def test_no_pager_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    seen = tmp_path / "paged"
    assert run_on(False, dict(os.environ, GIT_PAGER=f"cat > {seen}")) == "the review\n"
    assert not seen.exists()


def test_cat_or_empty_means_no_pager() -> None:
    for value in ("cat", ""):
        assert "the review" in run_on(True, dict(os.environ, GIT_PAGER=value))
