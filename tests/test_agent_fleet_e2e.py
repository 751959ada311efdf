"""Replicas on one PostgreSQL, end to end with real git, both helpers and the dev server.

A sandbox names every replica in CODESTORE_AGENT_URL (comma-separated); its helpers try
them in order. Replicas share grants and revocations through the database.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DevServer, OrgKey, commit, git, wait_for
from tests.test_agent import REPO, Agent, sandbox_env
from tests.test_agent_e2e import seed_repo
from tests.test_agent_store import create, replica


@pytest.fixture
def fleet(tmp_path: Path, dev_server: DevServer, org_key: OrgKey, pg_url: str) -> Iterator[tuple[DevServer, Agent, Agent]]:
    """The dev server with team/app (an ephemeral `base` branch), and two replicas on one database."""
    seed_repo(dev_server, tmp_path)
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    try:
        yield dev_server, a, b
    finally:
        a.stop()
        b.stop()


def test_created_on_one_replica_fetched_and_pushed_through_the_other_then_revoked(
    fleet: tuple[DevServer, Agent, Agent], tmp_path: Path
) -> None:
    server, a, b = fleet
    g = create(a, scopes=["git:read", "git:write"], ephemeral_only=True)
    env = sandbox_env(g["grant"], url=b.url)  # only replica B: A made the grant
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", f"codestore://acme/{REPO}+ephemeral", str(work), env=env)
    commit(work, "feat.txt", env=env)
    git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=work, env=env)
    assert a.cli("grant", "revoke", str(g["id"]), "--socket", a.socket).returncode == 0
    time.sleep(1.0)  # the promise: every replica refuses within a second
    proc = subprocess.run(["git", "fetch", "origin"], cwd=work, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "revoked" in proc.stderr, proc.stderr


def test_helpers_fail_over_when_a_replica_is_killed_mid_load(fleet: tuple[DevServer, Agent, Agent], tmp_path: Path,
                                                             refused_port: int) -> None:
    # Threat (availability): one replica's death stopping every sandbox.
    server, a, b = fleet
    g = create(a, scopes=["git:read", "git:write"], ephemeral_only=True)
    dead = f"http://127.0.0.1:{refused_port}"  # a replica that is already gone: refused at once
    env = sandbox_env(g["grant"], url=f"{dead},{a.url},{b.url}")
    url = f"{server.url}/{REPO}+ephemeral.git"
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            proc = subprocess.run(["git", "ls-remote", url], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                failures.append(proc.stderr)
            done[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: done[0] >= 4, timeout=60)
        before = done[0]
        a.proc.kill()  # SIGKILL, mid-load
        assert wait_for(lambda: done[0] >= before + 8, timeout=60)
        after = done[0]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert before > 0 and after > before, "no load ran"
    assert failures == []
    # Both kinds of helper use the list: the remote helper too.
    work = tmp_path / "clone"
    git("clone", "-q", "--branch", "base", f"codestore://acme/{REPO}+ephemeral", str(work), env=env)
    mints = [e for e in b.audit() if e["event"] == "mint" and e["grant"] == g["id"]]
    assert mints, "replica B never served after A died"
