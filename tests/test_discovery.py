"""How a helper finds the agent: one module reads the agent's environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from git_credential_codestore.agent import discovery
from git_credential_codestore.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_only_the_discovery_module_reads_the_agents_environment() -> None:
    # Five modules used to read these; each copy was a place a fix could miss.
    reads = re.compile(r"""(env|environ)\.get\(\s*["']CODESTORE_(AGENT|GRANT)""")
    readers = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "git_credential_codestore").rglob("*.py")) + sorted((ROOT / "remote_helper").rglob("*.py"))
        if reads.search(p.read_text())
    ]
    assert readers == []  # discovery.py itself reads them through its named constants
    assert set(discovery.AGENT_VARS) == {"CODESTORE_AGENT_URL", "CODESTORE_AGENT_SOCK", "CODESTORE_GRANT", "CODESTORE_GRANT_FILE"}


def test_a_grants_own_socket_sits_next_to_the_owner_socket() -> None:
    assert discovery.grant_socket("/run/u/codestore/agent.sock", "abc123") == "/run/u/codestore/grant-abc123.sock"


def test_the_cli_socket_is_the_option_then_the_environment_then_the_default(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert discovery.socket_path(None, env) == str(tmp_path / "codestore" / "agent.sock")
    assert discovery.socket_path(None, {**env, "CODESTORE_AGENT_SOCK": "/x/a.sock"}) == "/x/a.sock"
    assert discovery.socket_path("/y/b.sock", {**env, "CODESTORE_AGENT_SOCK": "/x/a.sock"}) == "/y/b.sock"


@pytest.mark.parametrize(
    "env,configured,grant,mode",
    [
        ({}, False, False, ""),
        ({"CODESTORE_GRANT": "csg_x"}, True, True, ""),
        ({"CODESTORE_GRANT_FILE": "/g"}, True, True, ""),
        ({"CODESTORE_AGENT_SOCK": "/s"}, True, False, ""),
        ({"CODESTORE_AGENT_URL": "https://a:1"}, True, False, ""),
        ({"CODESTORE_AGENT": "OFF"}, False, False, "off"),
        ({"CODESTORE_AGENT": "auto"}, False, False, "auto"),
    ],
)
def test_the_environment_names_the_agent_and_the_grant(env: dict[str, str], configured: bool, grant: bool, mode: str) -> None:
    assert (discovery.configured(env), discovery.holds_grant(env), discovery.mode(env)) == (configured, grant, mode)


def test_a_grant_comes_from_the_variable_or_the_file(tmp_path: Path) -> None:
    f = tmp_path / "grant"
    f.write_text("csg_abc_def\n")
    from_file, from_variable = discovery.read_grant({"CODESTORE_GRANT_FILE": str(f)}), discovery.read_grant({"CODESTORE_GRANT": " csg_1_2 "})
    assert from_file is not None and from_file.reveal() == "csg_abc_def"
    assert from_variable is not None and from_variable.reveal() == "csg_1_2"
    assert discovery.read_grant({}) is None
    f.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        discovery.read_grant({"CODESTORE_GRANT_FILE": str(f)})
