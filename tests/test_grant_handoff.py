"""`grant create` hands the secret over without glue: a 0600 file, or stdout alone.

Recipes (examples/) pass the secret to a provider's secret store; none of them may have
to parse JSON in shell to get it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.test_agent import REPO, Agent, mint, sandbox_env


def create(agent: Agent, *args: str) -> tuple[int, str, str]:
    proc = agent.cli("grant", "create", "--repo", REPO, *args)
    return proc.returncode, proc.stdout, proc.stderr


def grant_ids(agent: Agent) -> list[str]:
    return [g["id"] for g in json.loads(agent.cli("grant", "list", "--json").stdout)]


def test_secret_file_holds_only_the_secret_at_mode_0600_and_stdout_holds_the_id(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "grant"
    code, out, err = create(agent, "--secret-file", str(path))
    assert code == 0, err
    secret = path.read_text()
    assert secret.endswith("\n") and secret.count("\n") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (grant_id,) = out.split()
    assert grant_id in grant_ids(agent)
    # Threat: the secret echoed to a terminal or CI log when only a file was asked for.
    assert secret.strip() not in out + err
    # The file's content is a working grant as it stands.
    assert mint(sandbox_env(url=agent.url, CODESTORE_GRANT_FILE=str(path))).startswith("eyJ")


def test_secret_file_replaces_an_existing_file_and_never_writes_through_a_symlink(agent: Agent, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "grant"
    link.symlink_to(victim)
    code, _, err = create(agent, "--secret-file", str(link))
    assert code == 0, err
    # Threat: a planted symlink making the secret land in (or clobber) another file.
    assert victim.read_text() == "keep me\n"
    assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o600


def test_secret_file_replaces_only_a_grant_secret_never_other_data_or_a_device(agent: Agent, tmp_path: Path) -> None:
    # Threat: `--secret-file notes.txt` (a slip) silently replaced the file; as root,
    # `--secret-file /dev/full` replaced the device node with a file holding the secret.
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (notes, fifo):
        code, out, err = create(agent, "--secret-file", str(path))
        assert code == 1 and err.count("\n") == 1 and "name a new file" in err, err
    # A symlink leading to something that is not a file (/dev/stdout -> /proc/self/fd/1):
    # the link was replaced by a file holding the secret.
    to_pipe = tmp_path / "stdout"
    to_pipe.symlink_to(fifo)
    code, _, err = create(agent, "--secret-file", str(to_pipe))
    assert code == 1 and "--secret-only" in err and to_pipe.is_symlink(), err
    code, _, err = create(agent, "--secret-file", "")  # an unset $VAR: the secret went to stdout
    assert code == 2 and "'--secret-file': is empty" in err, err
    assert notes.read_text() == "precious\n" and stat.S_ISFIFO(fifo.lstat().st_mode) and grant_ids(agent) == []
    old = tmp_path / "grant"  # a sandbox re-provisioned: its old grant's secret is replaced
    assert create(agent, "--secret-file", str(old))[0] == 0
    first = old.read_text()
    assert create(agent, "--secret-file", str(old))[0] == 0 and old.read_text() != first and old.read_text().startswith("csg_")


def test_secret_only_prints_the_secret_and_nothing_else(agent: Agent) -> None:
    code, out, err = create(agent, "--secret-only")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.strip().isascii() and " " not in out.strip()
    assert mint(sandbox_env(out.strip(), url=agent.url)).startswith("eyJ")


def test_print_gives_the_fields_asked_for_one_per_line(agent: Agent) -> None:
    code, out, err = create(agent, "--own-socket", "--sub", "box-1", "--print", "id", "--print", "socket", "--print", "sub")
    assert code == 0, err
    grant_id, sock, sub = out.splitlines()
    assert grant_id in grant_ids(agent) and sub == "box-1"
    assert os.path.basename(sock) == f"grant-{grant_id}.sock" and Path(sock).is_socket()


def test_an_unwritable_secret_file_is_refused_before_any_grant_exists(agent: Agent, tmp_path: Path) -> None:
    code, out, err = create(agent, "--secret-file", str(tmp_path / "no-such-dir" / "grant"))
    assert code != 0 and err.startswith("codestore: ") and err.count("\n") == 1 and "create it first" in err
    assert grant_ids(agent) == []


def test_conflicting_output_options_say_which_to_drop(agent: Agent, tmp_path: Path) -> None:
    for args, hint in (
        (("--json", "--secret-only"), "--json"),
        (("--secret-file", str(tmp_path / "g"), "--secret-only"), "--secret-file"),
        (("--print", "socket"), "--own-socket"),
    ):
        code, _, err = create(agent, *args)
        assert code != 0 and hint in err and "Traceback" not in err, args
    assert grant_ids(agent) == []


def test_a_secret_that_cannot_be_written_after_the_grant_exists_leaves_no_live_grant(agent: Agent, tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The path was checked before the grant was made, but the write can still fail (a full
    # disk, the directory removed meanwhile): the secret then reached nobody, and the grant
    # stayed live. The write is made to fail in-process; the agent is the real one.
    from click.testing import CliRunner

    from git_credential_codestore.cli import cli
    from git_credential_codestore.cli import grant as grant_cli
    from git_credential_codestore.errors import CodestoreError

    def full_disk(path: str, secret: str) -> None:
        raise CodestoreError(f"cannot write the grant to {path}: No space left on device")

    monkeypatch.setattr(grant_cli, "_write_secret", full_disk)
    monkeypatch.setenv("CODESTORE_AGENT_SOCK", agent.socket)
    result = CliRunner().invoke(cli, ["grant", "create", "--repo", REPO, "--secret-file", str(tmp_path / "grant")])
    assert result.exit_code == 1 and "was revoked (its secret was never handed out)" in str(result.output) + str(result.exception)
    listed = json.loads(agent.cli("grant", "list", "--json").stdout)
    assert len(listed) == 1 and listed[0]["state"] == "revoked"
