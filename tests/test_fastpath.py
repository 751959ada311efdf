"""The helpers' fast path (git_credential_codestore/fastpath.py): every path git runs on
a fetch or push, run as the installed launcher runs it, imports nothing heavy.

Each path runs in its own interpreter (`python -I -S`, as install.sh's launchers start
the helpers) through a launcher that records `sys.modules` when the helper exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from git_credential_codestore import fastpath
from tests.conftest import ORG, DevServer, OrgKey, run_cli
from tests.test_agent import REPO, Agent

LAUNCHER = """#!{python} -IS
import sys
sys.path[:0] = {path!r}
import atexit
atexit.register(lambda: open({log!r}, "a").write(" ".join(sorted(sys.modules)) + "\\n"))
from {module} import main
raise SystemExit(main())
"""


def launchers(tmp_path: Path) -> tuple[Path, Path]:
    """A bin dir with both helpers, each logging its modules at exit; and the log."""
    bin_dir, log = tmp_path / "fastpath-bin", tmp_path / "modules.log"
    bin_dir.mkdir()
    for name, module in (("git-credential-codestore", "git_credential_codestore.credential"),
                         ("git-remote-codestore", "remote_helper.main")):
        p = bin_dir / name
        p.write_text(LAUNCHER.format(python=sys.executable, path=sys.path, log=str(log), module=module))
        p.chmod(0o755)
    return bin_dir, log


def configure_with_config_toml(base_url: str) -> dict[str, str]:
    """The machine as the README sets it up: `codestore config set` wrote config.toml."""
    env = {k: v for k, v in os.environ.items() if k not in ("CODESTORE_ORG", "CODESTORE_KID", "CODESTORE_BASE_URL")}
    for key, value in (("org", ORG), ("kid", "k1"), ("base_url", base_url)):
        proc = run_cli("codestore", "config", "set", key, value, env=env)
        assert proc.returncode == 0, proc.stderr
    return env


def credential(bin_dir: Path, env: dict[str, str], operation: str, request: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "git-credential-codestore"), operation], input=request,
                          capture_output=True, text=True, env=env, timeout=60)


def run_path(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[list[str], Path]:
    """Run one fast path; returns the modules it imported and the log file."""
    bin_dir, log = launchers(tmp_path)
    runners: dict[str, Callable[[], None]] = {}

    def foreign() -> None:
        env = dict(os.environ, CODESTORE_ORG=ORG)
        proc = credential(bin_dir, env, "get", "protocol=https\nhost=github.com\npath=a.git\n\n")
        assert proc.returncode == 0 and proc.stdout == "", proc.stderr

    def store_erase() -> None:
        env = dict(os.environ, CODESTORE_ORG=ORG)
        for op in ("store", "erase"):
            proc = credential(bin_dir, env, op, f"protocol=https\nhost={ORG}.code.storage\npassword=x\n\n")
            assert proc.returncode == 0 and proc.stdout == "", proc.stderr

    def agent_owner() -> None:
        server: DevServer = request.getfixturevalue("dev_server")
        request.getfixturevalue("agent")
        env = configure_with_config_toml(server.url)
        host = server.url.split("://", 1)[1]
        # `config set` left the parsed copy (config_cache.py): no TOML parser on this path.
        proc = credential(bin_dir, env, "get", f"protocol=http\nhost={host}\npath={REPO}.git\n\n")
        assert "password=eyJ" in proc.stdout, proc.stderr

    def grant() -> None:
        server: DevServer = request.getfixturevalue("dev_server")
        agent: Agent = request.getfixturevalue("agent")
        g = agent.grant("--repo", REPO)
        env = configure_with_config_toml(server.url)
        env = {k: v for k, v in env.items() if k != "CODESTORE_PRIVATE_KEY_FILE"}
        env.update(CODESTORE_AGENT_SOCK=agent.socket, CODESTORE_GRANT=str(g["grant"]))
        host = server.url.split("://", 1)[1]
        proc = credential(bin_dir, env, "get", f"protocol=http\nhost={host}\npath={REPO}.git\n\n")
        assert "password=eyJ" in proc.stdout, proc.stderr

    def capabilities() -> None:
        proc = subprocess.run([str(bin_dir / "git-remote-codestore"), "origin", f"codestore://{ORG}/{REPO}"],
                              input=b"capabilities\n\n", capture_output=True, env=dict(os.environ, CODESTORE_ORG=ORG),
                              timeout=60)
        assert proc.returncode == 0 and b"stateless-connect" in proc.stdout, proc.stderr

    def ls_remote() -> None:
        server: DevServer = request.getfixturevalue("dev_server")
        request.getfixturevalue("agent")
        server.create_repo(REPO)
        env = configure_with_config_toml(server.url)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        proc = subprocess.run(["git", "ls-remote", f"codestore://{ORG}/{REPO}"], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr

    runners.update({
        "credential get, another host": foreign,
        "credential store and erase": store_erase,
        "credential get via the agent, config.toml": agent_owner,
        "credential get via a grant": grant,
        "remote helper, capabilities only": capabilities,
        "remote helper ls-remote via the agent": ls_remote,
    })
    runners[name]()
    runs = log.read_text().splitlines()
    assert runs, "the helper did not run through the launcher"
    return runs[-1].split(), log


def test_every_fast_path_is_tested() -> None:
    assert set(PATH_NAMES) == set(fastpath.PATHS)


PATH_NAMES = list(fastpath.PATHS)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_a_fast_path_imports_nothing_heavy(name: str, tmp_path: Path, org_key: OrgKey,
                                           request: pytest.FixtureRequest) -> None:
    # Startup is paid on every git fetch and push: each path imports only what it needs.
    modules, _ = run_path(name, tmp_path, request)
    allowed = set(fastpath.PATHS[name])
    heavy = sorted(m for m in modules if m.split(".")[0] in fastpath.HEAVY or m in fastpath.HEAVY)
    heavy = [m for m in heavy if m not in allowed and m.split(".")[0] not in allowed]
    assert heavy == [], f"{name} imported {heavy}"
    ours = [m for m in modules if m.startswith(("git_credential_codestore", "remote_helper"))]
    assert set(ours) <= set(fastpath.MODULES), f"{name} imported {sorted(set(ours) - set(fastpath.MODULES))}"
