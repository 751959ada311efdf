"""The sandbox bootstrap, as a sandbox image would do it: install.sh plus two variables.

A clean environment (no inherited variables, a fresh HOME, no key, no keychain, no
codestore or git configuration) gets codestore from install.sh and then only
CODESTORE_AGENT_URL and CODESTORE_GRANT, plus CODESTORE_BASE_URL because the dev
server is not https://<org>.code.storage (tokens go only to the configured server).
Plain git must then clone from and push to the ephemeral namespace of the dev server
through codestore://acme/..., and be refused the default namespace.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import DevServer, OrgKey, git
from tests.leakscan import files_with_secrets, key_needles
from tests.test_agent import REPO, Agent
from tests.test_install import install


def clean_env(home: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """What a fresh container has: PATH, HOME and nothing else, plus what we add."""
    return {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",  # the machine's /etc/gitconfig is not the sandbox's
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "sandbox", "GIT_AUTHOR_EMAIL": "sandbox@example.com",
        "GIT_COMMITTER_NAME": "sandbox", "GIT_COMMITTER_EMAIL": "sandbox@example.com",
        **extra,
    }


def sh(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_install_sh_and_two_variables_make_a_working_keyless_sandbox(
    dev_server: DevServer, agent: Agent, org_key: OrgKey, tmp_path: Path
) -> None:
    dev_server.create_repo(REPO)
    grant = agent.grant("--repo", REPO, "--scopes", "git:write", "--ephemeral-only", "--sub", "sandbox-1")
    home, prefix, bin_dir = tmp_path / "sandbox-home", tmp_path / "sandbox-prefix", tmp_path / "sandbox-bin"
    home.mkdir()
    installed = install(prefix, bin_dir)
    assert installed.returncode == 0, installed.stderr

    env = clean_env(home, bin_dir, CODESTORE_AGENT_URL=agent.url, CODESTORE_GRANT=str(grant["grant"]),
                    CODESTORE_BASE_URL=dev_server.url)
    eph = f"codestore://acme/{REPO}+ephemeral"
    work = tmp_path / "work"
    proc = sh(["git", "clone", eph, str(work)], env)
    assert proc.returncode == 0, proc.stderr
    (work / "from-sandbox.txt").write_text("hi\n")
    assert sh(["git", "add", "."], env, work).returncode == 0
    assert sh(["git", "commit", "-qm", "sandbox work"], env, work).returncode == 0
    pushed = sh(["git", "push", "origin", "HEAD:refs/heads/sandbox-work"], env, work)
    assert pushed.returncode == 0, pushed.stderr
    # The owner, outside the sandbox, sees the branch in the ephemeral namespace.
    owner = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                 GIT_CONFIG_VALUE_0="Authorization: Bearer " + dev_server.token(REPO, ["git:read"]))
    assert "refs/heads/sandbox-work" in git("ls-remote", f"{dev_server.url}/{REPO}+ephemeral.git", env=owner).stdout

    # Threat: untrusted code in the sandbox writing the default namespace.
    default = sh(["git", "push", f"codestore://acme/{REPO}", "HEAD:refs/heads/main"], env, work)
    assert default.returncode != 0 and "ephemeral-only" in default.stderr
    # Nothing secret left in the sandbox's home or clone; the grant lives only in its environment.
    assert files_with_secrets(home, key_needles(org_key.pem) + [str(grant["grant"])]) == {}
    assert files_with_secrets(work / ".git", key_needles(org_key.pem) + [str(grant["grant"])]) == {}
    mints = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == grant["id"]]
    assert {e["sub"] for e in mints} == {"sandbox-1"}
