"""Bad input and a hostile machine found by probing the CLI: one line naming the fix, a
sane exit code, never a traceback, a hang or a lost setting."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, run_cli


def _one_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc
    return lines[0]


def test_config_set_run_together_loses_no_setting_and_never_crashes(tmp_path: Path) -> None:
    # Every writer used one temporary name (config.toml.tmp): O_TRUNC'd by another, or
    # removed by another's clean-up (FileNotFoundError, exit 3), and read-modify-write
    # without a lock lost the other's change.
    settings = {"org": "acme", "sub": "s1", "kid": "k9", "ttl": "120", "scopes": "git:read", "ephemeral_scopes": "git:read git:write"}
    for _ in range(3):
        procs = [subprocess.Popen([os.path.join(BIN, "codestore"), "config", "set", k, v], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k, v in settings.items()]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        text = (Path(os.environ["XDG_CONFIG_HOME"]) / "codestore" / "config.toml").read_text()
        for k, v in settings.items():
            assert f'{k} = "{v}"' in text, text
        assert not [p for p in (Path(os.environ["XDG_CONFIG_HOME"]) / "codestore").iterdir() if p.name.endswith(".tmp")]


def test_config_set_changes_a_symlinked_config_in_place_and_keeps_its_mode(tmp_path: Path) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "config.toml"
    target.write_text('org = "acme"\n')
    target.chmod(0o600)
    link = Path(os.environ["XDG_CONFIG_HOME"]) / "codestore" / "config.toml"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    assert run_cli("codestore", "config", "set", "ttl", "120").returncode == 0
    assert link.is_symlink() and 'ttl = "120"' in target.read_text() and stat.S_IMODE(target.stat().st_mode) == 0o600
    line = _one_line(run_cli("codestore", "config", "set", "ttl", "999999"), 1)
    assert ".tmp" not in line and str(link) in line, line  # the file the user knows, not a temporary one


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_an_org_that_is_not_a_name_is_refused_before_it_becomes_a_path(tmp_path: Path, how: str) -> None:
    # Threat: `--org ../../x key generate` wrote (and `key delete` removed) x.pem outside the keys directory.
    evil = "../../../../" + str(tmp_path / "pwn").lstrip("/")
    env = dict(os.environ)
    args = ["codestore", "key", "generate"]
    if how == "flag":
        args = ["codestore", "--org", evil, "key", "generate"]
    elif how == "env":
        env["CODESTORE_ORG"] = evil
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[orgs.personal]\norg = "{evil}"\n')
        env["CODESTORE_CONFIG"] = str(cfg)
        args = ["codestore", "--org", "personal", "key", "generate"]
    proc = run_cli(*args, env=env)
    assert proc.returncode in (1, 2) and "not an org name" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("pwn*"))


@pytest.mark.parametrize("var, value, says", [
    ("CODESTORE_SUB", "me\nforged line", "sub must be one line"),
    ("CODESTORE_KID", "k1\r\nx", "kid must be one line"),
    ("CODESTORE_SCOPES", " ", "scopes is empty"),
    ("CODESTORE_BASE_URL", "http://[::1", "must be an http(s) URL"),
])
def test_a_setting_that_would_break_lines_or_every_request_is_refused_at_load(var: str, value: str, says: str) -> None:
    proc = run_cli("codestore", "config", "show", env=dict(os.environ, CODESTORE_ORG="acme", **{var: value}))
    assert says in _one_line(proc)
    proc = run_cli("codestore", "doctor", env=dict(os.environ, CODESTORE_ORG="acme", **{var: value}))
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_trace_file_that_cannot_be_written_never_breaks_the_command() -> None:
    env = dict(os.environ, CODESTORE_ORG="acme", CODESTORE_TRACE="/dev/full")
    proc = run_cli("git-credential-codestore", "get", input="protocol=https\nhost=other.example\npath=a.git\n\n", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("cannot write the trace file /dev/full") == 1, proc.stderr  # said once, then traced to stderr


def test_a_path_that_is_a_directory_is_one_line_naming_it(tmp_path: Path) -> None:
    # An OSError about a path that reaches the boundary is the machine's, not a bug.
    keys = Path(os.environ["XDG_DATA_HOME"]) / "codestore" / "keys" / "acme.pem"
    keys.mkdir(parents=True)
    line = _one_line(run_cli("codestore", "key", "generate", "--force", env=dict(os.environ, CODESTORE_ORG="acme")))
    assert str(keys) in line and "not a regular file" in line, line
    record = Path(os.environ["XDG_STATE_HOME"]) / "codestore" / "setup.json"
    record.mkdir(parents=True)
    line = _one_line(run_cli("codestore", "setup", env=dict(os.environ, CODESTORE_ORG="acme")))  # was: internal error (IsADirectoryError)
    assert f"cannot use {record}: Is a directory" in line, line


def test_a_named_pipe_given_as_a_file_never_hangs(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # No writer at all: read as empty (open(2) would have waited forever).
    proc = run_cli("codestore", "config", "show", env=dict(os.environ, CODESTORE_ORG="acme", CODESTORE_CONFIG=str(fifo)), timeout=30)
    assert proc.returncode == 0, proc.stderr
    # A writer that never writes: given a few seconds, then one line.
    writer = os.open(fifo, os.O_RDWR)  # held open (O_RDWR does not wait for a reader), never written
    try:
        env = dict(os.environ, CODESTORE_ORG="acme", CODESTORE_GRANT_FILE=str(fifo), CODESTORE_AGENT_URL="http://127.0.0.1:9")
        line = _one_line(run_cli("codestore", "token", "team/app", env=env, timeout=30))
        assert "nothing more came from CODESTORE_GRANT_FILE" in line, line
    finally:
        os.close(writer)


def test_audit_says_what_is_wrong_with_its_filters_and_files(tmp_path: Path) -> None:
    env = dict(os.environ, CODESTORE_ORG="acme", CODESTORE_AGENT="off")
    assert "'bogus' is not one of" in _one_line(run_cli("codestore", "audit", "--event", "bogus", env=env), 2)  # was: "no matching entries"
    assert "does not exist" in _one_line(run_cli("codestore", "audit", "--file", str(tmp_path / "nope"), env=env), 2)
    # A file that never ends (or a pipe) is refused, not read forever.
    assert "not a regular file" in _one_line(run_cli("codestore", "audit", "--file", "/dev/zero", env=env, timeout=30))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in _one_line(run_cli("codestore", "audit", "--file", str(fifo), env=env, timeout=30))
    # A line that is not UTF-8 does not end the reading (it was UnicodeDecodeError, exit 3).
    trail = tmp_path / "trail.log"
    trail.write_bytes(b'{"time":"2026-11-29T00:00:00Z","event":"push","repo":"a\xff"}\n'
                      b'{"time":"2026-11-29T00:00:01Z","event":"push","repo":"team/app"}\n')
    proc = run_cli("codestore", "audit", "--file", str(trail), env=env)
    assert proc.returncode == 0 and "team/app" in proc.stdout and "Traceback" not in proc.stderr, proc


def test_config_set_never_replaces_what_is_not_a_file_nor_leaves_the_config_writable_by_others(tmp_path: Path) -> None:
    # CODESTORE_CONFIG=/dev/null (as root) replaced the device with a 0666 file; a FIFO too.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = _one_line(run_cli("codestore", "config", "set", "ttl", "120", env=dict(os.environ, CODESTORE_CONFIG=str(fifo))))
    assert "is not a regular file" in line and stat.S_ISFIFO(fifo.lstat().st_mode), line
    open_to_all = tmp_path / "c.toml"
    open_to_all.write_text('org = "acme"\n')
    open_to_all.chmod(0o666)
    assert run_cli("codestore", "config", "set", "ttl", "120", env=dict(os.environ, CODESTORE_CONFIG=str(open_to_all))).returncode == 0
    assert stat.S_IMODE(open_to_all.stat().st_mode) == 0o644


def test_an_org_on_the_command_line_that_is_not_a_name_is_a_usage_error() -> None:
    proc = run_cli("codestore", "--org", "a b", "config", "show")
    assert "not an org name" in _one_line(proc, 2)


def test_the_credential_helper_says_how_it_is_used_when_asked() -> None:
    proc = run_cli("git-credential-codestore", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: git-credential-codestore") and "codestore setup" in proc.stdout
