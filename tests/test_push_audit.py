"""Every push through codestore:// is audited with what it changed.

Real git pushes through git-remote-codestore to the dev server; the trail is the local
file (local key) or the agent's audit log (grant or owner through the agent).
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from git_credential_codestore import audit
from remote_helper import protocol, pushwatch
from remote_helper.protocol import LineReader
from tests.conftest import DevServer, commit, git, new_repo
from tests.test_agent import Agent, sandbox_env, start_agent
from tests.test_remote_helper import EPHEMERAL_URL, REPO, URL

ZERO = "0" * 40


def trail(home: Path) -> list[dict[str, object]]:
    return list(audit.read(str(home / ".local/state/codestore/audit.log")))


def pushes(entries: list[dict[str, object]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == "push"]


@pytest.fixture
def work(dev_server: DevServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    dev_server.create_repo(REPO)
    w = tmp_path / "w"
    git("init", "-q", str(w))
    git("remote", "add", "origin", URL, cwd=w)
    return w


# ---------------------------------------------------------------- the watch, in memory


def watched(advertisement: bytes, gits: bytes, answer: bytes, resolve: dict[str, str] | None = None) -> tuple[pushwatch.PushWatch, bytes]:
    """The advertisement lines the first transport returned, git's commands after the hook
    (as protocol.after_advertisement reads them), the second transport's answer."""
    watch = pushwatch.PushWatch()
    for line in advertisement.split(b"\n"):
        if line:
            watch.advertisement_line(line)
    push = protocol.after_advertisement(LineReader(io.BytesIO(gits).read), io.BytesIO().write, protocol.Decision("push"))
    assert push.operation == "push"
    watch.push(push, (resolve or {}).get)
    to_git = io.BytesIO()
    watch.results(LineReader(io.BytesIO(answer).read), to_git.write)
    return watch, to_git.getvalue()


A, B, C = "a" * 40, "b" * 40, "c" * 40


def test_the_watch_passes_the_answer_through_unchanged_and_notes_old_new_and_result() -> None:
    answer = b"ok refs/heads/main\nerror refs/heads/gone deny deleting\n\n"
    gits = b"option atomic false\npush +refs/heads/x:refs/heads/main\npush :refs/heads/gone\n\n"
    watch, to_git = watched(f"{A} refs/heads/main\n@refs/heads/main HEAD\n".encode(), gits, answer, {"refs/heads/x": B})
    assert to_git == answer
    assert watch.report() == [
        {"ref": "refs/heads/main", "old": A, "new": B, "forced": True, "result": "ok"},
        {"ref": "refs/heads/gone", "old": ZERO, "new": ZERO, "forced": False, "result": "error", "reason": "deny deleting"},
    ]


def test_report_status_v2_options_say_what_the_server_really_did() -> None:
    answer = f"ok refs/heads/main\noption new-oid {C}\noption forced-update\n\n".encode()
    watch, _ = watched(f"{A} refs/heads/main\n".encode(), b"push refs/heads/main:refs/heads/main\n\n", answer, {"refs/heads/main": B})
    assert watch.report()[0] == {"ref": "refs/heads/main", "old": A, "new": C, "forced": True, "result": "ok"}


def test_a_transport_that_dies_mid_push_leaves_the_result_unknown() -> None:
    watch, _ = watched(f"{A} refs/heads/main\n".encode(), b"push refs/heads/main:refs/heads/main\n\n", b"", {"refs/heads/main": B})
    assert watch.report()[0]["result"] == "unknown"


def test_a_dry_run_is_noted() -> None:
    watch, _ = watched(b"", b"option dry-run true\npush refs/heads/a:refs/heads/a\n\n", b"ok refs/heads/a\n\n", {"refs/heads/a": A})
    assert watch.dry_run
    assert watch.report()[0]["result"] == "ok"


# ---------------------------------------------------------------- with a local key


def test_a_push_with_a_local_key_is_recorded_with_old_and_new_sha(work: Path, hermetic: Path) -> None:
    first = commit(work, "a")
    git("push", "-q", "origin", "main", cwd=work)
    second = commit(work, "b")
    git("push", "-q", "origin", "main", cwd=work)
    entries = pushes(trail(hermetic))
    assert [(e["refs"][0]["old"], e["refs"][0]["new"], e["result"]) for e in entries] == [
        (ZERO, first, "ok"), (first, second, "ok"),
    ]
    assert entries[0]["repo"] == REPO and entries[0]["ephemeral"] is False
    assert entries[0]["via"] == "local-key" and entries[0]["grant"] is None and entries[0]["sub"]


def test_a_push_of_more_refs_than_one_report_holds_is_recorded_whole(work: Path, hermetic: Path) -> None:
    # Threat: a sandbox hiding its one push that matters among 1000 decoy refs: a report over
    # MAX_REFS was refused, and the push went unrecorded ("not in the audit trail").
    from git_credential_codestore.audit import MAX_REFS

    head = commit(work, "a")
    names = [f"refs/heads/decoy-{n:04d}" for n in range(MAX_REFS)] + ["refs/heads/main"]
    subprocess.run(["git", "update-ref", "--stdin"], cwd=work, check=True, timeout=60,
                   input="".join(f"create {name} {head}\n" for name in names[:-1]), text=True)
    proc = git("push", "origin", *(f"{name}:{name}" for name in names), cwd=work)
    assert "not in the audit trail" not in proc.stderr, proc.stderr
    recorded = [r["ref"] for e in pushes(trail(hermetic)) for r in e["refs"]]
    assert sorted(recorded) == sorted(names)


def test_a_refused_non_fast_forward_is_recorded_as_refused_with_the_reason(work: Path, hermetic: Path, tmp_path: Path) -> None:
    commit(work, "a")
    git("push", "-q", "origin", "main", cwd=work)
    other = tmp_path / "other"
    git("clone", "-q", URL, str(other))
    server_head = commit(other, "theirs")
    git("push", "-q", "origin", "main", cwd=other)
    mine = commit(work, "mine")
    assert git("push", "origin", "main", cwd=work, check=False).returncode != 0
    last = pushes(trail(hermetic))[-1]
    assert last["result"] == "error"
    assert last["refs"] == [  # old: what the server had; new: what was offered
        {"ref": "refs/heads/main", "old": server_head, "new": mine, "forced": False, "result": "error", "reason": "fetch first"}
    ]


def test_deleting_a_branch_and_pushing_to_ephemeral_are_recorded(work: Path, hermetic: Path) -> None:
    sha = commit(work, "a")
    git("push", "-q", EPHEMERAL_URL, "main:refs/heads/feat", cwd=work)
    git("push", "-q", EPHEMERAL_URL, ":refs/heads/feat", cwd=work)
    made, deleted = pushes(trail(hermetic))
    assert made["ephemeral"] is True and made["refs"][0] == {"ref": "refs/heads/feat", "old": ZERO, "new": sha, "forced": False, "result": "ok"}
    assert deleted["refs"][0]["old"] == sha and deleted["refs"][0]["new"] == ZERO


def test_a_dry_run_and_a_fetch_leave_no_push_in_the_trail(work: Path, hermetic: Path, tmp_path: Path) -> None:
    commit(work, "a")
    git("push", "-q", "--dry-run", "origin", "main", cwd=work)
    git("clone", "-q", URL, str(tmp_path / "c"))
    assert pushes(trail(hermetic)) == []


# ---------------------------------------------------------------- through the agent


@pytest.fixture
def agent(tmp_path: Path, dev_server: DevServer) -> Iterator[Agent]:
    a = start_agent(tmp_path)
    yield a
    a.stop()


def test_a_sandbox_push_is_recorded_by_the_agent_with_its_grant_and_sub(
    agent: Agent, dev_server: DevServer, tmp_path: Path, hermetic: Path
) -> None:
    dev_server.create_repo(REPO)
    grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only", "--sub", "sandbox-7")
    env = sandbox_env(grant["grant"], url=agent.url)
    w = tmp_path / "sb"
    new_repo(w, "f", "x", "f", env=env)
    sha = git("rev-parse", "HEAD", cwd=w).stdout.strip()
    proc = git("push", "-q", EPHEMERAL_URL, "HEAD:refs/heads/feat", cwd=w, env=env)
    assert len(pushes(agent.audit())) == 1, proc.stderr
    [entry] = pushes(agent.audit())
    assert (entry["grant"], entry["sub"], entry["via"]) == (grant["id"], "sandbox-7", "tcp")
    assert entry["repo"] == REPO and entry["ephemeral"] is True
    assert entry["refs"] == [{"ref": "refs/heads/feat", "old": ZERO, "new": sha, "forced": False, "result": "ok"}]
    assert pushes(trail(hermetic)) == []  # nothing in the sandbox's own files


def test_a_push_the_server_refuses_is_recorded_as_refused_with_its_reason(agent: Agent, dev_server: DevServer, tmp_path: Path) -> None:
    dev_server.create_repo(REPO)
    grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--ref-policy", "refs/heads/locked=no-push")
    env = sandbox_env(grant["grant"], url=agent.url)
    w = tmp_path / "sb"
    new_repo(w, "f", "x", "f", env=env)
    sha = git("rev-parse", "HEAD", cwd=w).stdout.strip()
    proc = git("push", URL, "HEAD:refs/heads/locked", "HEAD:refs/heads/open", cwd=w, env=env, check=False)
    assert proc.returncode != 0
    assert len(pushes(agent.audit())) == 1, proc.stderr
    [entry] = pushes(agent.audit())
    # The server's policy check refuses the whole push (as a pre-receive hook does).
    assert entry["result"] == "error"
    locked, opened = sorted(entry["refs"], key=lambda r: r["ref"])
    assert (locked["ref"], locked["new"], locked["result"]) == ("refs/heads/locked", sha, "error")
    assert (opened["ref"], opened["new"], opened["result"]) == ("refs/heads/open", sha, "error")
    assert "hook" in str(locked["reason"]) or "declined" in str(locked["reason"])


def report_as(agent: Agent, grant: str | None, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    from git_credential_codestore.agent.client import Endpoint, call
    from git_credential_codestore.secrets import Secret

    return call(Endpoint.from_url(agent.url) if grant else Endpoint("unix", agent.socket), "POST", "/v1/audit/report",
                body, grant=Secret(grant) if grant else None, env=agent.env)


GOOD = {"event": "push", "repo": REPO, "ephemeral": True, "refs": [{"ref": "refs/heads/feat", "old": ZERO, "new": A, "result": "ok"}]}


def test_a_grant_holder_cannot_claim_another_identity_in_a_report(agent: Agent) -> None:
    # Threat: a sandbox tries to have its push recorded under someone else's name.
    grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--sub", "sandbox-1")
    status, _ = report_as(agent, str(grant["grant"]), {**GOOD, "grant": "ffff", "sub": "owner", "owner_sub": "owner"})
    assert status == 201
    [entry] = pushes(agent.audit())
    assert (entry["grant"], entry["sub"]) == (grant["id"], "sandbox-1")


def test_a_grant_holder_cannot_write_into_another_repositorys_trail(agent: Agent) -> None:
    # Threat: a sandbox pollutes the audit trail of a repository its grant does not cover.
    grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write")
    status, reply = report_as(agent, str(grant["grant"]), {**GOOD, "repo": "team/other"})
    assert status == 403 and "does not cover" in str(reply["error"])
    assert pushes(agent.audit()) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event": "mint"}, "event"),
        ({"repo": "../x"}, "repo"),
        ({"refs": []}, "refs"),
        ({"refs": [{"ref": "refs/heads/a\nforged", "new": A, "result": "ok"}]}, "ref"),
        ({"refs": [{"ref": "refs/heads/a", "new": "HEAD", "result": "ok"}]}, "new"),
        ({"refs": [{"ref": "refs/heads/a", "new": A, "result": "great"}]}, "result"),
    ],
)
def test_a_malformed_report_is_refused_and_not_recorded(agent: Agent, change: dict[str, object], field: str) -> None:
    # Threat: a sandbox injects forged lines or junk into the trail through a report.
    grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write")
    status, reply = report_as(agent, str(grant["grant"]), {**GOOD, **change})
    assert status == 400 and field in str(reply["error"])
    assert pushes(agent.audit()) == []


def test_a_revoked_or_unknown_grant_cannot_report(agent: Agent) -> None:
    status, _ = report_as(agent, "cs_grant_0000_bogus", GOOD)
    assert status == 401
    assert pushes(agent.audit()) == []


def test_only_the_owner_may_query_the_trail(agent: Agent) -> None:
    # Threat: a sandbox reads other sandboxes' activity from the trail.
    from git_credential_codestore.agent.client import Endpoint, call
    from git_credential_codestore.secrets import Secret

    grant = agent.grant("--repo", REPO, "--scopes", "git:read")
    status, _ = call(Endpoint.from_url(agent.url), "POST", "/v1/audit/query", {}, grant=Secret(str(grant["grant"])), env=agent.env)
    assert status == 403
    status, reply = call(Endpoint("unix", agent.socket), "POST", "/v1/audit/query", {"event": "grant-create"}, env=agent.env)
    entries: list[dict[str, object]] = reply["entries"]  # type: ignore[assignment]  # JSON
    assert status == 200 and [e["grant"] for e in entries] == [grant["id"]]
