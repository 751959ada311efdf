"""The layering the README's layout section promises, checked on the source itself.

- Only the CLI package (`git_credential_codestore/cli/`) imports click: the git helpers,
  the agent and the dev server run without it.
- The core never imports `remote_helper`: that package is git's remote-helper protocol
  and nothing else, built on the core, never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "git_credential_codestore"
CLI = CORE / "cli"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


CORE_FILES = sorted(p for p in CORE.rglob("*.py") if CLI not in p.parents)
HELPER_FILES = sorted((ROOT / "remote_helper").rglob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES + HELPER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_cli_package_imports_click(path: Path) -> None:
    assert "click" not in top_level(imported_modules(path))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_never_imports_the_remote_helper(path: Path) -> None:
    assert "remote_helper" not in top_level(imported_modules(path))


def test_every_cli_module_is_registered_on_the_codestore_command() -> None:
    from git_credential_codestore import cli

    modules = {p.stem for p in CLI.glob("*.py")} - {"__init__", "__main__"}
    registered = {c.callback.__module__.rsplit(".", 1)[-1] for c in cli.cli.commands.values()}
    assert modules == registered
