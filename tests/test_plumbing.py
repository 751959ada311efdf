"""Shared plumbing: atomic writes, the dev server's start-up contract, explicit environments."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from git_credential_codestore import config, demo, files, processes, setup
from git_credential_codestore.errors import CodestoreError, ConfigError


def test_an_atomic_write_creates_the_file_with_its_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    tmp_path = tmp_path / "d"
    tmp_path.mkdir()
    path = tmp_path / "secret.pem"
    files.write_atomic(str(path), "one", 0o600)
    files.write_atomic(str(path), b"two", 0o600, fsync=True)
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.pem"]


def test_a_failed_check_keeps_the_old_file(tmp_path: Path) -> None:
    tmp_path = tmp_path / "d"
    tmp_path.mkdir()
    path = tmp_path / "config.toml"
    path.write_text('org = "acme"\n')

    def refuse(tmp: str) -> None:
        raise ConfigError("bad")

    with pytest.raises(ConfigError):
        files.write_atomic(str(path), "garbage", 0o644, check=refuse)
    assert path.read_text() == 'org = "acme"\n' and sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_a_later_write(tmp_path: Path) -> None:
    # SIGKILL between write_atomic's open and its rename left `secret.pem.PID-XXXX.tmp`: for a
    # key or a grant, a second copy of the secret that nothing ever removed.
    import signal
    import subprocess
    import sys
    import time

    tmp_path = tmp_path / "d"
    tmp_path.mkdir()
    path = tmp_path / "secret.pem"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from git_credential_codestore import files\n"
         f"files.write_atomic({str(path)!r}, 'PRIVATE', 0o600, check=lambda tmp: (print('ready', flush=True), time.sleep(60)))"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        (left,) = tmp_path.iterdir()
        assert left.name.startswith(f"secret.pem.{writer.pid}-") and left.read_text() == "PRIVATE"
        busy = tmp_path / f"secret.pem.{alive.pid}-0000abcd.tmp"  # a writer still at work
        busy.write_text("in flight")
        files.write_atomic(str(path), "one", 0o600)
        assert left.exists()  # a minute's grace: its writer may live in another pid namespace
        old = time.time() - 2 * files.STALE_TMP
        for f in (left, busy):
            os.utime(f, (old, old))
        files.write_atomic(str(path), "two", 0o600)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["secret.pem", busy.name])
        assert path.read_text() == "two"
    finally:
        alive.kill()
        alive.wait()


def test_a_dev_server_that_cannot_start_says_why_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(CodestoreError, match="did not start"):
        processes.start_dev_server(["--port", "0", "--host", "10.0.0.1", "--data-dir", str(tmp_path)])


def test_the_demo_builds_its_own_environment_and_leaves_the_callers_alone(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "HOME": "/real/home", "CODESTORE_GRANT": "csg_x", "GIT_DIR": "/x"}
    env = demo.demo_environment(str(tmp_path), base)
    assert base == {"PATH": "/usr/bin", "HOME": "/real/home", "CODESTORE_GRANT": "csg_x", "GIT_DIR": "/x"}
    assert env["HOME"].startswith(str(tmp_path)) and env["GIT_CONFIG_GLOBAL"].startswith(str(tmp_path))
    assert "CODESTORE_GRANT" not in env and "GIT_DIR" not in env


def test_setup_changes_the_git_config_of_the_environment_it_is_given(tmp_path: Path, hermetic: Path) -> None:
    home = tmp_path / "other"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), GIT_CONFIG_GLOBAL=str(home / ".gitconfig"), XDG_STATE_HOME=str(home / "state"))
    cfg = config.load({"CODESTORE_ORG": "acme", "CODESTORE_CONFIG": "/nonexistent"})
    assert setup.setup(cfg, env)
    assert "codestore" in (home / ".gitconfig").read_text()
    assert (home / "state" / "codestore" / "setup.json").exists()
    assert "codestore" not in (hermetic / ".gitconfig").read_text()  # this process's git config is untouched
    assert setup.undo(cfg, env) and not setup.is_configured(cfg.base_url, env)
