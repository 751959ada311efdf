"""install.sh: a real install into a temporary prefix, run twice (it must be idempotent)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ORG, git, make_key

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("codestore", "git-credential-codestore", "git-remote-codestore")


def install(prefix: Path, bin_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH="/usr/local/bin:/usr/bin:/bin:" + os.environ["PATH"])
    return subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--prefix", str(prefix), "--bin-dir", str(bin_dir), *extra],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, env=env,
    )


def test_install_links_the_programs_configures_git_and_is_idempotent(tmp_path: Path, hermetic: Path) -> None:
    prefix, bin_dir = tmp_path / "prefix", tmp_path / "bin"
    first = install(prefix, bin_dir, "--user", "--org", ORG, "--setup")
    assert first.returncode == 0, first.stderr
    for prog in PROGRAMS:
        link = bin_dir / prog
        assert link.is_symlink() and os.access(link, os.X_OK)
        assert Path(os.readlink(link)).parent == prefix / "venv" / "bin"
    version = subprocess.run([str(bin_dir / "codestore"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "codestore" in version.stdout
    # --setup configured git by command name, not by a path into the venv.
    helpers = git("config", "--global", "--get-all", f"credential.https://{ORG}.code.storage.helper").stdout
    assert helpers.splitlines() == ["", "codestore"]
    gitconfig = (hermetic / ".gitconfig").read_text()

    # The git helpers start through install.sh's lean launchers, and work through them.
    for prog in ("git-credential-codestore", "git-remote-codestore"):
        first_line = (prefix / "venv" / "bin" / prog).read_text().splitlines()[0]
        assert first_line == f"#!{prefix}/venv/bin/python -IS"
    key = make_key(tmp_path)
    fill = subprocess.run(
        ["git", "credential", "fill"], input=f"url=https://{ORG}.code.storage/team/app.git\n\n",
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", CODESTORE_PRIVATE_KEY_FILE=str(key.path)),
    )
    assert fill.returncode == 0 and "password=eyJ" in fill.stdout, fill.stderr

    second = install(prefix, bin_dir, "--user", "--org", ORG, "--setup")
    assert second.returncode == 0, second.stderr
    assert "already set up" in second.stdout
    assert (hermetic / ".gitconfig").read_text() == gitconfig
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(PROGRAMS)


def test_install_rejects_unknown_options_with_one_line(tmp_path: Path) -> None:
    proc = install(tmp_path / "p", tmp_path / "b", "--frobnicate")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "--help" in proc.stderr
    assert not (tmp_path / "p").exists()
