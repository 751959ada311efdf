"""A keyless sandbox, end to end: real git, both helpers, the agent, the dev server.

The owner's environment holds the org key and runs the agent; the sandbox's has no key,
only the agent's address and a grant for the ephemeral namespace of one repository.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DevServer, OrgKey, commit, git, new_repo, run_cli
from tests.leakscan import files_with_secrets
from tests.test_agent import REPO, Agent, sandbox_env, start_agent


def seed_repo(dev_server: DevServer, tmp_path: Path) -> None:
    """team/app on the dev server, its ephemeral `base` branch pushed by the owner."""
    owner = dict(os.environ, CODESTORE_EPHEMERAL_SCOPES="git:read git:write", CODESTORE_SCOPES="git:read git:write")
    assert run_cli("codestore", "setup", env=owner).returncode == 0
    dev_server.create_repo(REPO)
    seed = tmp_path / "seed"
    new_repo(seed, "README", "hello\n", "seed")
    git("push", "-q", f"{dev_server.url}/{REPO}+ephemeral.git", "HEAD:refs/heads/base", cwd=seed, env=owner)


@pytest.fixture
def world(tmp_path: Path, dev_server: DevServer, org_key: OrgKey) -> Iterator[tuple[DevServer, Agent, dict[str, object]]]:
    """The dev server with team/app, its ephemeral `base` branch seeded by the owner; an agent; a grant."""
    seed_repo(dev_server, tmp_path)
    agent = start_agent(tmp_path)
    try:
        grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only", "--sub", "sandbox-e2e")
        yield dev_server, agent, grant
    finally:
        agent.stop()


def sandbox(agent: Agent, grant: dict[str, object], via: str) -> dict[str, str]:
    """No key and no scope settings: the grant alone decides what the sandbox may do."""
    where = {"sock": agent.socket} if via == "socket" else {"url": agent.url}
    env = sandbox_env(grant["grant"], **where)
    for name in ("CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_PRIVATE_KEY", "CODESTORE_SCOPES", "CODESTORE_EPHEMERAL_SCOPES"):
        assert name not in env
    return env


def push_new_branch(url: str, work: Path, env: dict[str, str], branch: str) -> None:
    """As a sandbox does: clone `base`, commit BRANCH.txt, push it as BRANCH; the server lists it."""
    git("clone", "-q", "--branch", "base", url, str(work), env=env)
    commit(work, f"{branch}.txt", env=env)
    git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=work, env=env)
    assert f"refs/heads/{branch}" in git("ls-remote", url, env=env).stdout


@pytest.mark.parametrize("via", ["socket", "http"])
def test_a_keyless_sandbox_clones_and_pushes_the_ephemeral_namespace_through_the_credential_helper(
    world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path, via: str
) -> None:
    server, agent, grant = world
    env = sandbox(agent, grant, via)
    url = f"{server.url}/{REPO}+ephemeral.git"
    work = tmp_path / "work"
    push_new_branch(url, work, env, "feat")
    mints = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == grant["id"]]
    assert mints and all(e["sub"] == "sandbox-e2e" and e["ephemeral"] for e in mints)
    # Threat: the grant or a token left behind in the clone or the server's records.
    needles = [str(grant["grant"])]
    assert files_with_secrets(work / ".git", needles) == {}
    assert files_with_secrets(server.data_dir, needles) == {}


def test_a_keyless_sandbox_clones_and_pushes_through_codestore_urls(
    world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path
) -> None:
    server, agent, grant = world
    env = sandbox(agent, grant, "http")
    work = tmp_path / "work"
    push_new_branch(f"codestore://acme/{REPO}+ephemeral", work, env, "feat2")
    # The remote helper asked for read on fetch and write only on push, both clamped to the grant.
    mints = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == grant["id"]]
    reads = [e for e in mints if "git:write" not in e["scopes"]]
    writes = [e for e in mints if "git:write" in e["scopes"]]
    # One push: a write token for the advertisement, and one minted for the pack after
    # the pre-push hook would have run; clone and ls-remote read only.
    assert len(writes) == 2 and len(reads) >= 2
    assert all(e["via"] == "tcp" for e in mints)


@pytest.mark.parametrize("url_form", ["http", "codestore"])
def test_the_sandbox_cannot_touch_the_default_namespace_and_git_says_why_in_one_line(
    world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path, url_form: str
) -> None:
    # Threat: untrusted code reaching the default namespace with an ephemeral-only grant.
    server, agent, grant = world
    env = sandbox(agent, grant, "socket")
    url = f"{server.url}/{REPO}.git" if url_form == "http" else f"codestore://acme/{REPO}"
    proc = subprocess.run(["git", "ls-remote", url], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "ephemeral-only" in ln]
    assert len(lines) == 1, proc.stderr
    assert agent.audit()[-1]["result"] == "refused"


def test_after_revocation_the_sandbox_can_no_longer_fetch(world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path) -> None:
    # Threat: a sandbox keeping access after its owner pulled the plug.
    server, agent, grant = world
    env = sandbox(agent, grant, "socket")
    url = f"{server.url}/{REPO}+ephemeral.git"
    git("ls-remote", url, env=env)
    assert agent.cli("grant", "revoke", str(grant["id"])).returncode == 0
    proc = subprocess.run(["git", "ls-remote", url], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "revoked" in proc.stderr


def test_a_read_only_grant_clones_through_the_credential_helper_but_cannot_push(
    world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path
) -> None:
    # Threat: the credential helper's "at most read+write" request widening a read grant.
    server, agent, _ = world
    reader = agent.grant("--repo", REPO, "--ephemeral-only", "--sub", "reader")
    env = sandbox(agent, reader, "socket")
    url = f"{server.url}/{REPO}+ephemeral.git"
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", url, str(work), env=env)
    commit(work, "nope.txt", env=env)
    assert git("push", "origin", "HEAD:refs/heads/nope", cwd=work, env=env, check=False).returncode != 0
    mints = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == reader["id"]]
    assert mints and all(e["scopes"] == ["git:read"] for e in mints)


def test_a_grants_ref_policy_travels_in_the_token_and_the_server_enforces_it(
    world: tuple[DevServer, Agent, dict[str, object]], tmp_path: Path
) -> None:
    # Threat: a sandbox rewriting a protected branch; the rule is in the token, so a
    # server enforces it even if the sandbox bypassed every codestore check.
    server, agent, _ = world
    g = agent.grant("--repo", REPO, "--scopes", "git:write", "--ephemeral-only", "--ref-policy", "refs/heads/base=no-push")
    env = sandbox(agent, g, "socket")
    url = f"codestore://acme/{REPO}+ephemeral"
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", url, str(work), env=env)
    commit(work, "change.txt", env=env)
    refused = git("push", "origin", "HEAD:refs/heads/base", cwd=work, env=env, check=False)
    assert refused.returncode != 0
    assert "no-push" in refused.stderr and "refs/heads/base" in refused.stderr
    git("push", "-q", "origin", "HEAD:refs/heads/other", cwd=work, env=env)  # other branches are fine
    writes = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == g["id"] and "git:write" in e["scopes"]]
    # Two pushes, each with an advertisement token and a push token.
    assert len(writes) == 4 and all(e["refs"] == [["refs/heads/base", ["no-push"]]] for e in writes)
