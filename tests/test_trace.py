"""CODESTORE_TRACE: one line per decision, and never a token, a grant or a key."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from git_credential_codestore import trace
from tests.conftest import DevServer, OrgKey, git, run_cli
from tests.leakscan import key_needles, secrets_in_text
from tests.test_agent import start_agent

REPO = "team/app"


@pytest.mark.parametrize(
    "value,where",
    [
        ("", None), ("0", None), ("false", None), ("NO", None), ("off", None), (" 0 ", None),
        ("1", ""), ("true", ""), ("Yes", ""), ("on", ""),
        ("/tmp/trace.log", "/tmp/trace.log"),
    ],
)
def test_trace_values_read_like_a_git_trace_key(value: str, where: str | None) -> None:
    assert trace.target({"CODESTORE_TRACE": value}) == where


def test_a_relative_trace_path_is_refused_in_one_line_and_tracing_stays_off(capsys: pytest.CaptureFixture[str],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_said", set())  # what this process has said already
    assert trace.target({"CODESTORE_TRACE": "trace.log"}) is None
    assert trace.target({"CODESTORE_TRACE": "trace.log"}) is None  # every trace point asks: said once, not at each
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absolute" in err


def test_the_official_helpers_pierre_debug_turns_tracing_on() -> None:
    assert trace.target({"PIERRE_DEBUG": "1"}) == ""
    # Ours wins when both are set.
    assert trace.target({"PIERRE_DEBUG": "1", "CODESTORE_TRACE": "0"}) is None
    assert trace.target({"PIERRE_DEBUG": "1", "CODESTORE_TRACE": "/x/t"}) == "/x/t"
    assert trace.target({"PIERRE_DEBUG": "1", "CODESTORE_DEBUG": "0"}) is None


def test_tracing_off_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    trace.say("test", "hello", {})
    assert capsys.readouterr() == ("", "")


def test_a_trace_line_redacts_anything_token_shaped(tmp_path: Path) -> None:
    # Threat: a caller builds a message from a value that holds a token.
    path = tmp_path / "t.log"
    trace.say("test", "Authorization: Bearer eyJhbGciOi.eyJpc3MiOi.c2lnbmF0dXJl", {"CODESTORE_TRACE": str(path)})
    text = path.read_text()
    assert "eyJ" not in text and "<redacted>" in text and text.count("\n") == 1
    assert (path.stat().st_mode & 0o077) == 0


def test_the_credential_helper_traces_a_foreign_host_as_silent(tmp_path: Path) -> None:
    from git_credential_codestore import credential

    path = tmp_path / "t.log"
    env = {"CODESTORE_ORG": "acme", "CODESTORE_CONFIG": str(tmp_path / "none.toml"), "CODESTORE_TRACE": str(path)}
    out = io.BytesIO()
    credential.run(["get"], io.BytesIO(b"protocol=https\nhost=github.com\npath=a.git\npassword=hunter2\n\n"), out, io.BytesIO(), env)
    text = path.read_text()
    assert out.getvalue() == b""
    assert "get https://github.com/a.git" in text and "not our host" in text and "hunter2" not in text


def test_every_flow_traced_shows_each_decision_and_no_secret(
    dev_server: DevServer, org_key: OrgKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: a debugging switch that prints what it is debugging: a token in a trace line,
    # a grant in the agent's trace, key material when the key source is named.
    log = tmp_path / "trace.log"
    monkeypatch.setenv("CODESTORE_TRACE", str(log))
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    monkeypatch.setenv("CODESTORE_AGENT", "off")
    assert run_cli("codestore", "setup").returncode == 0
    dev_server.create_repo(REPO)
    stderr: list[str] = []

    # The credential helper (local key): clone, commit, push.
    work = tmp_path / "work"
    git("clone", "-q", f"{dev_server.url}/{REPO}.git", str(work))
    (work / "a").write_text("a\n")
    git("add", "a", cwd=work)
    git("commit", "-qm", "a", cwd=work)
    stderr.append(git("push", "-q", "origin", "HEAD:main", cwd=work).stderr)
    # The remote helper: clone and push.
    work2 = tmp_path / "work2"
    stderr.append(git("clone", "-q", f"codestore://acme/{REPO}", str(work2)).stderr)
    (work2 / "b").write_text("b\n")
    git("add", "b", cwd=work2)
    git("commit", "-qm", "b", cwd=work2)
    stderr.append(git("push", "-q", "origin", "HEAD:main", cwd=work2).stderr)
    # The CLI: a token on stdout (never in the trace), state commands, a refusal.
    tok = run_cli("codestore", "token", REPO)
    assert tok.returncode == 0 and tok.stdout.startswith("eyJ")
    token = tok.stdout.strip()
    for args in (["config", "show"], ["key", "public"], ["repo", "list"], ["doctor"], ["token", "../x"]):
        stderr.append(run_cli("codestore", *args).stderr)
    # The agent and a sandbox holding a read-only grant: a fetch, then a refused push.
    agent = start_agent(tmp_path)
    try:
        grant = str(agent.grant("--repo", REPO, "--scopes", "git:read")["grant"])
        sandbox = {k: v for k, v in os.environ.items() if k not in ("CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_AGENT")}
        sandbox.update(CODESTORE_AGENT_SOCK=agent.socket, CODESTORE_GRANT=grant)
        work3 = tmp_path / "work3"
        stderr.append(git("clone", "-q", f"codestore://acme/{REPO}", str(work3), env=sandbox).stderr)
        refused = git("push", "-q", "origin", "HEAD:refs/heads/x", cwd=work3, env=sandbox, check=False)
        assert refused.returncode != 0
        stderr.append(refused.stderr)
    finally:
        agent.stop()
        assert agent.proc.stderr is not None
    text = log.read_text()
    for decision in (
        "config: ",                                  # which file was read
        "source: the local key (CODESTORE_AGENT=off)",  # which source
        "key: signing team/app",                     # which key, by where it came from
        f"credential: get http://{dev_server.url.split('://')[1]}/{REPO}.git",  # what git asked
        "remote: ", "wants to push",                 # the remote helper's operation
        "source: the agent at",                      # the sandbox's source
        "with a grant",
        "agent: minted team/app git:read",           # the agent's decision
        "agent: refused team/app",                   # ... and its refusal
        "refused (",                                 # a refusal as the user saw it
    ):
        assert decision in text, decision
    needles = [token, grant, *key_needles(org_key.pem)]
    assert secrets_in_text(text, needles) == []
    assert secrets_in_text("".join(stderr), needles) == []
