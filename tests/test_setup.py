"""`codestore setup` and `--undo`: git configured exactly, and restored exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ORG, git, run_cli

BASE = f"https://{ORG}.code.storage"


def helpers() -> list[str]:
    proc = git("config", "--global", "--get-all", f"credential.{BASE}.helper", check=False)
    return proc.stdout.splitlines()


@pytest.fixture(autouse=True)
def org(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", ORG)


def test_setup_resets_the_chain_then_adds_ours_by_command_name() -> None:
    proc = run_cli("codestore", "setup")
    assert proc.returncode == 0, proc.stderr
    # The empty value stops earlier helpers (store, osxkeychain) from saving our tokens;
    # a bare command name keeps working after codestore is upgraded or moved.
    assert helpers() == ["", "codestore"]
    assert git("config", "--global", f"credential.{BASE}.useHttpPath").stdout.strip() == "true"


def test_setup_is_idempotent(hermetic: Path) -> None:
    run_cli("codestore", "setup")
    first = (hermetic / ".gitconfig").read_text()
    proc = run_cli("codestore", "setup")
    assert "already set up" in proc.stdout
    assert (hermetic / ".gitconfig").read_text() == first


def test_setup_replaces_a_helper_that_would_store_our_tokens_and_undo_restores_it(hermetic: Path) -> None:
    # Threat: git-credential-store writing a short-lived token to ~/.git-credentials.
    git("config", "--global", "--add", f"credential.{BASE}.helper", "store")
    git("config", "--global", "user.name", "Someone")
    before = (hermetic / ".gitconfig").read_text()
    run_cli("codestore", "setup")
    assert helpers() == ["", "codestore"]
    proc = run_cli("codestore", "setup", "--undo")
    assert proc.returncode == 0, proc.stderr
    assert helpers() == ["store"]
    assert git("config", "--global", "user.name").stdout.strip() == "Someone"
    assert (hermetic / ".gitconfig").read_text().count("helper") == before.count("helper")


def test_undo_removes_everything_setup_added(hermetic: Path) -> None:
    before = (hermetic / ".gitconfig").read_text()
    run_cli("codestore", "setup")
    run_cli("codestore", "setup", "--undo")
    assert (hermetic / ".gitconfig").read_text() == before


def test_undo_without_an_org_undoes_every_setup_even_of_orgs_the_config_does_not_name(
        hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `setup --org personal --base-url URL` configured a host no config file names; a later
    # `setup --undo` undid only the configured org's entries and left those behind.
    before = (hermetic / ".gitconfig").read_text()
    assert run_cli("codestore", "setup").returncode == 0
    assert run_cli("codestore", "setup", "--org", "personal", "--base-url", "http://127.0.0.1:8765").returncode == 0
    assert "127.0.0.1:8765" in (hermetic / ".gitconfig").read_text()
    proc = run_cli("codestore", "setup", "--undo")
    assert proc.returncode == 0 and proc.stdout.count("restored") == 2, proc.stdout
    assert (hermetic / ".gitconfig").read_text() == before
    monkeypatch.delenv("CODESTORE_ORG")  # and with no org configured at all, the record still says what to undo
    assert run_cli("codestore", "setup", "--org", "personal", "--base-url", "http://127.0.0.1:8765").returncode == 0
    proc = run_cli("codestore", "setup", "--undo")
    assert proc.returncode == 0 and "restored" in proc.stdout, proc.stderr
    assert (hermetic / ".gitconfig").read_text() == before


def test_undo_without_setup_changes_nothing(hermetic: Path) -> None:
    before = (hermetic / ".gitconfig").read_text()
    proc = run_cli("codestore", "setup", "--undo")
    assert proc.returncode == 0 and "nothing to undo" in proc.stdout
    assert (hermetic / ".gitconfig").read_text() == before


@pytest.mark.parametrize("record", ["{garbage", json.dumps({BASE: 5}), "[]"])
def test_undo_works_when_the_setup_record_is_lost_or_damaged(hermetic: Path, record: str) -> None:
    # A damaged record made undo say "nothing to undo" (or crash: AttributeError) and left
    # our entries; setup then said "already set up" and recorded nothing, for good.
    before = (hermetic / ".gitconfig").read_text()
    run_cli("codestore", "setup")
    state = hermetic / ".local/state/codestore/setup.json"
    state.write_text(record)
    proc = run_cli("codestore", "setup", "--undo")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert helpers() == [] and (hermetic / ".gitconfig").read_text() == before


def test_undo_restores_only_keys_setup_writes(hermetic: Path) -> None:
    # Threat: a setup record naming any git key (core.sshCommand) made undo write it.
    run_cli("codestore", "setup")
    state = hermetic / ".local/state/codestore/setup.json"
    state.write_text(json.dumps({BASE: {"core.sshCommand": ["touch /tmp/pwned-by-undo"], f"credential.{BASE}.helper": []}}))
    assert run_cli("codestore", "setup", "--undo").returncode == 0
    assert git("config", "--global", "core.sshCommand", check=False).stdout == "" and helpers() == []


def test_global_credential_store_helper_is_never_consulted_for_our_host(hermetic: Path, org_key) -> None:
    # Threat: a global `credential.helper=store` saving and replaying our tokens.
    git("config", "--global", "credential.helper", "store")
    run_cli("codestore", "setup")
    proc = git("credential", "fill", check=False)  # no input: just ensure git runs
    import subprocess

    fill = subprocess.run(["git", "credential", "fill"], input=f"url={BASE}/team/app.git\n\n", capture_output=True, text=True, timeout=60)
    assert fill.returncode == 0, fill.stderr
    approve = subprocess.run(["git", "credential", "approve"], input=fill.stdout, capture_output=True, text=True, timeout=60)
    assert approve.returncode == 0
    assert not (hermetic / ".git-credentials").exists()
    del proc


def test_setup_warns_about_a_helper_configured_after_ours(hermetic: Path) -> None:
    # Threat: `git config --global credential.helper store` run after setup appends
    # store after our entries, and git then asks it to save our tokens.
    run_cli("codestore", "setup")
    git("config", "--global", "credential.helper", "store")
    proc = run_cli("codestore", "setup")
    assert "warning" in proc.stderr and "'store'" in proc.stderr


def test_doctor_flags_a_helper_configured_after_ours(hermetic: Path) -> None:
    run_cli("codestore", "setup")
    git("config", "--global", "credential.helper", "store")
    proc = run_cli("codestore", "doctor")
    assert proc.returncode == 1
    assert any(line.startswith("FAIL git setup") and "'store'" in line for line in proc.stdout.splitlines())


def test_effective_chain_ignores_helpers_for_other_hosts(hermetic: Path) -> None:
    from git_credential_codestore.setup import effective_chain

    run_cli("codestore", "setup")
    git("config", "--global", "credential.https://github.com.helper", "store")
    git("config", "--global", "--add", f"credential.{BASE}/team.helper", "cache")
    assert effective_chain(BASE) == ["codestore"]
    assert effective_chain(BASE + "/team/app.git") == ["codestore", "cache"]
