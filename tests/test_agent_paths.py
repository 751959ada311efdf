"""Where the agent puts its socket and logs, and what it refuses to touch (issue 8 items 5, 9)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from git_credential_codestore.agent.client import Endpoint, call
from tests.conftest import BIN, OrgKey, stop_process
from tests.test_agent import start_agent


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--state-dir", str(tmp_path / "state"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sockets"
    d.mkdir(mode=0o700)
    return d


def test_serve_never_deletes_a_regular_file_at_the_socket_path(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: `--socket` or CODESTORE_AGENT_SOCK pointed at a user's file deleting it.
    victim = private_dir(tmp_path) / "notes.txt"
    victim.write_text("precious\n")
    code, err = finish(serve(tmp_path, "--socket", str(victim)))
    assert code == 2 and err.count("\n") == 1 and "is not a socket" in err and "Traceback" not in err, err
    assert victim.read_text() == "precious\n"


def test_a_socket_nobody_answers_is_replaced(tmp_path: Path, org_key: OrgKey) -> None:
    path = private_dir(tmp_path) / "agent.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # left behind, as by an agent that was SIGKILLed
    a = start_agent(tmp_path, "--socket", str(path))
    try:
        assert call(Endpoint("unix", str(path)), "GET", "/v1/ping")[0] == 200
    finally:
        a.stop()


def test_two_agents_racing_for_one_path_leave_exactly_one_serving(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: two agents (a restart storm, two service managers) killing each other.
    path = private_dir(tmp_path) / "agent.sock"
    procs = [serve(tmp_path / str(i), "--socket", str(path)) for i in range(4)]
    try:
        deadline = time.monotonic() + 30
        while sum(p.poll() is None for p in procs) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # the survivor's socket check runs every second
        alive = [p for p in procs if p.poll() is None]
        assert len(alive) == 1
        assert call(Endpoint("unix", str(path)), "GET", "/v1/ping")[0] == 200
        for p in procs:
            if p is not alive[0]:
                code, err = finish(p)
                assert code == 1 and "already running" in err and err.count("\n") == 1, err
    finally:
        for p in procs:
            stop_process(p)


@pytest.mark.parametrize("option", ["--socket", "--audit-log"])
def test_an_option_naming_a_directory_is_one_line_and_a_usage_exit(tmp_path: Path, org_key: OrgKey, option: str) -> None:
    d = private_dir(tmp_path)
    args = [option, str(d)] if option == "--socket" else ["--socket", str(d / "agent.sock"), option, str(d)]
    code, err = finish(serve(tmp_path, *args))
    assert code == 2 and err.count("\n") == 1 and "is a directory" in err and "Traceback" not in err, err


def test_without_xdg_runtime_dir_the_agent_and_helpers_meet_in_a_private_temp_dir(tmp_path: Path, org_key: OrgKey) -> None:
    # No XDG_RUNTIME_DIR and no /run/user/<uid> (containers, cron): a 0700 dir of our own.
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip("this machine has /run/user/<uid>: the fallback is not used")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    a = start_agent(tmp_path, env=env)
    try:
        expected = tmp_path / "tmp" / f"codestore-{os.getuid()}" / "agent.sock"
        assert a.socket == str(expected)
        assert stat.S_IMODE(expected.parent.stat().st_mode) == 0o700
        status = subprocess.run([os.path.join(BIN, "codestore"), "agent", "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and str(expected) in status.stdout, status.stderr
    finally:
        a.stop()


def test_a_temp_dir_owned_by_someone_else_is_refused_in_one_line(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: another user pre-creating /tmp/codestore-<uid> to catch our socket.
    if os.path.isdir(f"/run/user/{os.getuid()}") or os.getuid() != 0:
        pytest.skip("needs root (to make a directory owned by another uid) and no /run/user/<uid>")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path / "tmp")
    trap = tmp_path / "tmp" / f"codestore-{os.getuid()}"
    trap.mkdir(parents=True, mode=0o777)
    os.chown(trap, 65534, 65534)
    code, err = finish(serve(tmp_path, env=env))
    assert code == 2 and err.count("\n") == 1 and "belongs to uid 65534" in err and "XDG_RUNTIME_DIR" in err, err
    assert list(trap.iterdir()) == []
