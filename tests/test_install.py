"""install.sh: a real install into a temporary prefix, run twice (it must be idempotent)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ORG, git, make_key

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("codestore", "git-credential-codestore", "git-remote-codestore")


def install(prefix: Path, bin_dir: Path, *extra: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH="/usr/local/bin:/usr/bin:/bin:" + os.environ["PATH"])
    return subprocess.run(
        ["bash", str(root / "install.sh"), "--prefix", str(prefix), "--bin-dir", str(bin_dir), *extra],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, env=env,
    )


def test_install_links_the_programs_configures_git_and_is_idempotent(tmp_path: Path, hermetic: Path) -> None:
    prefix, bin_dir = tmp_path / "prefix", tmp_path / "bin"
    # From a checkout an older install built in: pip builds a local project in its tree, and
    # setuptools' build/lib kept a module since removed, which went into the install.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", ".*cache", ".hypothesis", "__pycache__"))
    stale = src / "build" / "lib" / "git_credential_codestore" / "removed_since.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    tree = sorted(p.relative_to(src) for p in src.rglob("*"))
    first = install(prefix, bin_dir, "--user", "--org", ORG, "--setup", root=src)
    assert first.returncode == 0, first.stderr
    assert not list(prefix.rglob("removed_since.py"))
    # Nothing was built in the tree either (two installs from one tree at once collided there).
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == tree
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

    second = install(prefix, bin_dir, "--user", "--org", ORG, "--setup", root=src)
    assert second.returncode == 0, second.stderr
    assert "already set up" in second.stdout
    assert (hermetic / ".gitconfig").read_text() == gitconfig
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(PROGRAMS)


def test_install_rejects_unknown_options_with_one_line(tmp_path: Path) -> None:
    proc = install(tmp_path / "p", tmp_path / "b", "--frobnicate")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "--help" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_install_names_the_extras_it_knows(tmp_path: Path) -> None:
    # --extras goes into pip's requirement: only the project's own extras, checked first.
    proc = install(tmp_path / "p", tmp_path / "b", "--extras", "fleet]; rm -rf /")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "the extras are fleet and recipes" in proc.stderr
    assert not (tmp_path / "p").exists()


def _private_python3(tmp_path: Path) -> Path:
    """A directory (0700, as root's home is) holding a working python3: pyenv or conda as root."""
    import shutil
    import sys

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copy2(os.path.realpath(sys.executable), private / "python3")
    return private


@pytest.mark.skipif(os.geteuid() != 0, reason="the system-wide default applies to root only")
def test_as_root_with_a_private_python_the_default_install_is_for_root_alone(tmp_path: Path, hermetic: Path) -> None:
    # The README's first command (./install.sh --demo) run by a root developer whose python3
    # is pyenv's: a refusal there would stop a newcomer at step one.
    private = _private_python3(tmp_path)
    env = dict(os.environ, PATH=f"{private}:/usr/local/bin:/usr/bin:/bin")
    proc = subprocess.run(["bash", str(ROOT / "install.sh")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "installing for root only" in proc.stderr and "--system" in proc.stderr
    # The per-user defaults, under the (hermetic) HOME: not /opt/codestore, not /usr/local/bin.
    data_home = Path(os.environ.get("XDG_DATA_HOME") or hermetic / ".local" / "share")
    assert (data_home / "codestore" / "venv" / "bin" / "codestore").exists()
    assert (Path(os.environ["HOME"]) / ".local" / "bin" / "codestore").is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="the system-wide default applies to root only")
def test_an_explicit_system_install_with_a_private_python_is_refused_in_one_line(tmp_path: Path) -> None:
    # Threat-free but fatal: an image whose programs its non-root user cannot run.
    private = _private_python3(tmp_path)
    env = dict(os.environ, PATH=f"{private}:/usr/local/bin:/usr/bin:/bin")
    proc = subprocess.run(["bash", str(ROOT / "install.sh"), "--system", "--prefix", str(tmp_path / "p"),
                           "--bin-dir", str(tmp_path / "b")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "other users cannot run" in proc.stderr and not (tmp_path / "p").exists()
