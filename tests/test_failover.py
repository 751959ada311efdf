"""Failover, proven: one sandbox dies mid-task, another elsewhere continues its branch.

The promise: when one provider fails, clone the same repository somewhere else and go on.
Sandbox A (its own user and HOME) pushes work to +ephemeral with a grant, starts more
work and is killed (SIGKILL, no clean-up) before pushing it. Sandbox B (another user,
another HOME) with the same grant runs the same recipe script: it finds the branch,
clones it, continues and pushes. Work A never pushed is lost, and only that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import DevServer, git
from tests.sandboxes import (
    Image,
    User,
    as_user,
    give,
    make_home,
    sandbox_env,
    sandbox_user,
)
from tests.test_agent import REPO, Agent

BRANCH = "sandbox/failover"


def test_a_second_sandbox_continues_the_branch_a_killed_one_pushed(
    image: Image, sandbox_base: Path, dev_server: DevServer, agent: Agent, tmp_path: Path
) -> None:
    dev_server.create_repo(REPO)
    secret = tmp_path / "grant"
    made = agent.cli("grant", "create", "--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only",
                     "--sub", "task-7", "--secret-file", str(secret))
    assert made.returncode == 0, made.stderr
    grant_id = made.stdout.strip()

    def sandbox(name: str) -> tuple[User, dict[str, str]]:
        user = sandbox_user(f"codestore-sbx-{name}")
        home = make_home(sandbox_base, user, f"home-{name}")
        (home / "grant").write_text(secret.read_text())
        give(home / "grant", user, 0o600)
        env = sandbox_env(home, image, CODESTORE_AGENT_URL=agent.url, CODESTORE_GRANT_FILE=str(home / "grant"),
                          CODESTORE_BASE_URL=dev_server.url, CODESTORE_REPO=f"acme/{REPO}", CODESTORE_BRANCH=BRANCH,
                          GIT_AUTHOR_NAME=f"sandbox-{name}", GIT_AUTHOR_EMAIL=f"{name}@sandbox",
                          GIT_COMMITTER_NAME=f"sandbox-{name}", GIT_COMMITTER_EMAIL=f"{name}@sandbox")
        return user, env

    user_a, env_a = sandbox("a")
    first = as_user(user_a, ["codestore-work"], dict(env_a, CODESTORE_TASK="echo one > one.txt"))
    assert first.returncode == 0, first.stderr

    # A's next step writes its work, then is killed before it can push.
    work2 = Path(env_a["HOME"]) / "work2"
    doomed = as_user(user_a, ["codestore-work"], dict(env_a, CODESTORE_WORKDIR=str(work2),
                                                       CODESTORE_TASK="echo two > two.txt && sleep 300"), start=True)
    assert isinstance(doomed, subprocess.Popen)
    deadline = time.monotonic() + 120
    while not (work2 / "two.txt").exists():
        assert doomed.poll() is None and time.monotonic() < deadline, doomed.communicate()[1] if doomed.poll() is not None else "timeout"
        time.sleep(0.1)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.communicate(timeout=30)

    user_b, env_b = sandbox("b")
    second = as_user(user_b, ["codestore-work"], dict(env_b, CODESTORE_TASK="test -f one.txt && echo three > three.txt"))
    assert second.returncode == 0, second.stderr

    owner = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                 GIT_CONFIG_VALUE_0="Authorization: Bearer " + dev_server.token(REPO, ["git:read"]))
    check = tmp_path / "check"
    git("clone", "-q", "--branch", BRANCH, f"{dev_server.url}/{REPO}+ephemeral.git", str(check), env=owner)
    assert (check / "one.txt").exists() and (check / "three.txt").exists()
    assert not (check / "two.txt").exists()  # A's unpushed work died with A, and only that
    authors = git("log", "--format=%an", cwd=check).stdout.split()
    assert authors == ["sandbox-b", "sandbox-a"]  # B's commit sits on top of A's

    # The audit trail: write tokens minted for the one grant before and after the kill. A push
    # through codestore:// mints two: one for the advertisement, one after the pre-push hook.
    pushes = [e for e in agent.audit() if e["event"] == "mint" and e["grant"] == grant_id and "git:write" in e["scopes"]]
    assert len(pushes) == 2 * 2 and {e["sub"] for e in pushes} == {"task-7"}
    served = [r for r in dev_server.requests() if "git-receive-pack" in str(r.get("path")) and r.get("status") == 200]
    assert len(served) == 2
