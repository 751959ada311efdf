"""The distribution as it would be published: one wheel build, then a `uv tool` install.

`codestore` on PyPI is another project's placeholder, so the distribution is
`codestore-git`; the commands and the top-level packages keep their names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from git_credential_codestore import __version__

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
DIST = "codestore-git"
UV = os.path.join(os.path.dirname(sys.executable), "uv")


def uv_env(base: Path) -> dict[str, str]:
    return dict(os.environ, UV_CACHE_DIR=str(base / "uv-cache"), UV_TOOL_DIR=str(base / "uv-tools"),
                UV_TOOL_BIN_DIR=str(base / "uv-bin"), UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The wheel built from a copy of the tracked files (the checkout stays untouched)."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = base / "dist"
    proc = subprocess.run([UV, "build", "--wheel", "-q", "-o", str(out), str(src)], env=uv_env(base),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("*.whl")
    yield built, base


def test_the_wheel_is_codestore_git_with_an_spdx_license_and_the_license_file(wheel: tuple[Path, Path]) -> None:
    built, _ = wheel
    assert built.name == f"codestore_git-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(built) as z:
        names = z.namelist()
        info = f"codestore_git-{__version__}.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert f"Name: {DIST}\n" in meta and f"Version: {__version__}\n" in meta
    assert "License-Expression: MIT\n" in meta and f"{info}/licenses/LICENSE" in names
    assert "Classifier: Operating System :: Microsoft :: Windows" in meta and "Project-URL: Source, " in meta
    # The layout's top-level packages, unchanged; no tests or benchmarks shipped.
    assert {n.split("/")[0] for n in names} == {"git_credential_codestore", "remote_helper", info}
    for line in ("codestore = git_credential_codestore.cli:main",
                 "git-credential-codestore = git_credential_codestore.credential:main",
                 "git-remote-codestore = remote_helper.main:main"):
        assert line in entry_points


def test_uv_tool_installs_the_wheel_and_every_program_runs(wheel: tuple[Path, Path]) -> None:
    built, base = wheel
    env = uv_env(base)
    proc = subprocess.run([UV, "tool", "install", "--python", sys.executable, str(built)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for prog in ("codestore", "git-credential-codestore", "git-remote-codestore"):
        out = subprocess.run([str(base / "uv-bin" / prog), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"{'codestore, version' if prog == 'codestore' else prog} {__version__}"
