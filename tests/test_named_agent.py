"""A named agent is the policy: a grant socket needs no local scopes, the owner keeps its own.

A sandbox that mounts a grant's own socket (`grant create --own-socket`) sets only
CODESTORE_AGENT_SOCK: it holds no grant secret, so only the agent can tell the socket is a
grant's. The helpers therefore ask the agent for at most what the operation needs and let
it decide by who asks: the grant's terms on a grant socket, the agent's own configuration
for the owner. Real agent, real git, both helpers, the dev server's request log.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DevServer, commit, git
from tests.test_agent import REPO, Agent, sandbox_env, start_agent
from tests.test_agent_e2e import push_new_branch, seed_repo

EPHEMERAL_HTTP = "{server}/" + REPO + "+ephemeral.git"
EPHEMERAL_CS = f"codestore://acme/{REPO}+ephemeral"
DEFAULT_CS = f"codestore://acme/{REPO}"


def git_requests(server: DevServer, before: int) -> list[dict[str, Any]]:
    """The git requests the dev server saw since `before` (each with its token's scopes)."""
    return [r for r in server.requests()[before:] if r.get("service")]


def run_git(*args: str, cwd: Path | None = None, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# -- a sandbox with a grant socket and nothing else ----------------------------------------


@pytest.fixture
def grant_box(tmp_path: Path, dev_server: DevServer) -> Iterator[tuple[DevServer, Agent, str, dict[str, str]]]:
    """The dev server with team/app (ephemeral `base` seeded), an agent, an ephemeral-only
    read+write grant with its own socket, and a sandbox environment naming only that socket."""
    seed_repo(dev_server, tmp_path)
    agent = start_agent(tmp_path)
    try:
        out = agent.cli("grant", "create", "--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only",
                        "--sub", "box-sock", "--own-socket", "--print", "id", "--print", "socket")
        assert out.returncode == 0, out.stderr
        grant_id, sock = out.stdout.split()
        env = sandbox_env(sock=sock)
        # No grant secret, no key, no scope settings: the socket alone.
        for name in ("CODESTORE_GRANT", "CODESTORE_GRANT_FILE", "CODESTORE_AGENT_URL", "CODESTORE_PRIVATE_KEY_FILE",
                     "CODESTORE_SCOPES", "CODESTORE_EPHEMERAL_SCOPES"):
            assert name not in env
        yield dev_server, agent, grant_id, env
    finally:
        agent.stop()


def test_a_grant_socket_alone_pushes_the_ephemeral_namespace_through_codestore_urls_with_least_privilege(
    grant_box: tuple[DevServer, Agent, str, dict[str, str]], tmp_path: Path
) -> None:
    server, agent, grant_id, env = grant_box
    before = len(server.requests())
    work = tmp_path / "work"
    push_new_branch(EPHEMERAL_CS, work, env, "feat")
    git("fetch", "-q", "origin", cwd=work, env=env)
    seen = git_requests(server, before)
    reads = [r for r in seen if r["service"] == "git-upload-pack"]
    pushes = [r for r in seen if r["service"] == "git-receive-pack"]
    # Threat: a fetch holding a token that can push (least privilege per operation).
    assert reads and all(r["scopes"] == ["git:read"] for r in reads)
    assert pushes and all(r["scopes"] == ["git:read", "git:write"] and r["ephemeral"] for r in pushes)
    mints = [e for e in agent.audit() if e["event"] == "mint"]
    assert mints and all(e["grant"] == grant_id and e["via"] == "grant-socket" and e["sub"] == "box-sock" for e in mints)


def test_a_grant_socket_alone_pushes_the_ephemeral_namespace_through_the_credential_helper(
    grant_box: tuple[DevServer, Agent, str, dict[str, str]], tmp_path: Path
) -> None:
    server, agent, grant_id, env = grant_box
    push_new_branch(EPHEMERAL_HTTP.format(server=server.url), tmp_path / "work", env, "feat-https")
    # git's credential protocol does not say fetch or push: at most read+write, the grant's.
    mints = [e for e in agent.audit() if e["event"] == "mint"]
    assert mints and all(e["grant"] == grant_id and e["via"] == "grant-socket" and e["purpose"] == "credential" for e in mints)


@pytest.mark.parametrize("url_form", ["codestore", "https"])
def test_a_grant_socket_push_to_the_default_namespace_is_refused_by_the_agent_in_one_line(
    grant_box: tuple[DevServer, Agent, str, dict[str, str]], tmp_path: Path, url_form: str
) -> None:
    # Threat: untrusted code reaching the default namespace through an ephemeral-only grant's socket.
    server, agent, _, env = grant_box
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", EPHEMERAL_CS, str(work), env=env)
    commit(work, "escape.txt", env=env)
    before = len(server.requests())
    target = DEFAULT_CS if url_form == "codestore" else f"{server.url}/{REPO}.git"
    proc = run_git("push", target, "HEAD:refs/heads/main", cwd=work, env=env)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "ephemeral-only" in ln]
    assert len(lines) == 1, proc.stderr
    assert "configuration forbids" not in proc.stderr  # the agent refused, not local settings
    assert agent.audit()[-1]["result"] == "refused"
    assert not [r for r in git_requests(server, before) if r["service"] == "git-receive-pack" and r.get("status") == 200]


# -- the owner naming its own agent keeps its configured least privilege ------------------


@pytest.fixture
def owner_box(tmp_path: Path, dev_server: DevServer) -> Iterator[tuple[DevServer, Agent, dict[str, str]]]:
    """An agent whose configuration allows git:read, and read+write in +ephemeral; the owner's
    helpers name its socket in CODESTORE_AGENT_SOCK and have no scope settings of their own."""
    seed_repo(dev_server, tmp_path)
    agent = start_agent(tmp_path, env=dict(os.environ, CODESTORE_SCOPES="git:read",
                                           CODESTORE_EPHEMERAL_SCOPES="git:read git:write"))
    try:
        env = dict(os.environ, CODESTORE_AGENT_SOCK=agent.socket)
        yield dev_server, agent, env
    finally:
        agent.stop()


def test_the_owner_naming_its_agent_gets_a_read_token_for_a_fetch_and_a_one_line_refusal_for_a_push(
    owner_box: tuple[DevServer, Agent, dict[str, str]], tmp_path: Path
) -> None:
    # Threat: naming the owner socket in CODESTORE_AGENT_SOCK widening the owner's configured scopes.
    server, agent, env = owner_box
    before = len(server.requests())
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", EPHEMERAL_CS, str(work), env=env)
    git("ls-remote", DEFAULT_CS, env=env)
    reads = [r for r in git_requests(server, before) if r["service"] == "git-upload-pack"]
    assert reads and all(r["scopes"] == ["git:read"] for r in reads)
    commit(work, "owner.txt", env=env)
    before = len(server.requests())
    proc = run_git("push", DEFAULT_CS, "HEAD:refs/heads/main", cwd=work, env=env)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("codestore:")]
    assert len(ours) == 1, proc.stderr
    assert "the agent's configuration forbids writing to team/app in the default namespace" in ours[0]
    assert '`scopes = "git:read git:write"`' in ours[0] and ours[0].endswith("(or CODESTORE_SCOPES) and restart the agent")
    assert not [r for r in git_requests(server, before) if r["service"] == "git-receive-pack"]
    refusal = agent.audit()[-1]
    assert refusal["result"] == "refused" and refusal["grant"] is None and refusal["via"] == "socket"
    # What the agent's configuration does allow still works: +ephemeral is read+write there.
    git("push", "-q", "origin", "HEAD:refs/heads/owner-feat", cwd=work, env=env)


def test_the_owner_naming_its_agent_gets_what_its_configuration_allows_through_the_credential_helper(
    owner_box: tuple[DevServer, Agent, dict[str, str]], tmp_path: Path
) -> None:
    server, agent, env = owner_box
    before = len(server.requests())
    git("ls-remote", f"{server.url}/{REPO}.git", env=env)
    git("ls-remote", f"{server.url}/{REPO}+ephemeral.git", env=env)
    seen = git_requests(server, before)
    by_namespace = {r["ephemeral"]: r["scopes"] for r in seen if r.get("status") == 200}
    # At most read+write asked; the agent's configuration decided per namespace.
    assert by_namespace == {False: ["git:read"], True: ["git:read", "git:write"]}
    mints = [e for e in agent.audit() if e["event"] == "mint" and e["purpose"] == "credential"]
    assert {(e["ephemeral"], tuple(e["scopes"])) for e in mints} == {
        (False, ("git:read",)), (True, ("git:read", "git:write")),
    }
