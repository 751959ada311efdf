"""End to end through git-credential-codestore: real git, the real dev server, `http://` URLs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jwt
import pytest

from tests.conftest import Clock, DevServer, commit, git, run_cli, slow_pre_push_hook
from tests.leakscan import files_with_secrets, key_needles, run_git_traced, secrets_in_text

REPO = "team/app"


@pytest.fixture
def configured(dev_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> DevServer:
    """codestore setup for the dev server, write allowed on team/app."""
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    proc = run_cli("codestore", "setup")
    assert proc.returncode == 0, proc.stderr
    dev_server.create_repo(REPO)
    return dev_server


def test_clone_commit_push_fetch_through_the_helper(configured: DevServer, tmp_path: Path) -> None:
    url = f"{configured.url}/{REPO}.git"
    a, b = tmp_path / "a", tmp_path / "b"
    git("clone", "-q", url, str(a))
    commit(a, "one.txt")
    git("push", "-q", "origin", "HEAD:main", cwd=a)
    git("clone", "-q", url, str(b))
    assert (b / "one.txt").exists()
    commit(b, "two.txt")
    git("push", "-q", "origin", "HEAD:main", cwd=b)
    git("pull", "-q", "origin", "main", cwd=a)
    assert (a / "two.txt").exists()
    # The server saw only tokens it verified, for this repository, via the helper.
    authed = [r for r in configured.requests() if r.get("scopes")]
    assert authed and all(r["repo"] == REPO for r in authed)


def test_the_default_read_only_token_cannot_push(dev_server: DevServer, tmp_path: Path) -> None:
    # Threat: a sandbox configured only to read being able to write.
    run_cli("codestore", "setup")
    url = dev_server.create_repo(REPO)
    git("clone", "-q", url, str(tmp_path / "c"))
    commit(tmp_path / "c", "f.txt")
    proc = git("push", "origin", "HEAD:main", cwd=tmp_path / "c", check=False)
    assert proc.returncode != 0
    assert "git:write" in proc.stderr
    pushes = [r for r in dev_server.requests() if r.get("service") == "git-receive-pack" and r.get("scopes")]
    assert pushes and all("git:write" not in r["scopes"] for r in pushes)


def test_ephemeral_only_write_pushes_to_ephemeral_and_not_to_the_default_namespace(
    dev_server: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODESTORE_EPHEMERAL_SCOPES", "git:read git:write")
    run_cli("codestore", "setup")
    url = dev_server.create_repo(REPO)
    work = tmp_path / "w"
    git("clone", "-q", url, str(work))
    commit(work, "f.txt")
    git("push", "-q", f"{dev_server.url}/{REPO}+ephemeral.git", "HEAD:refs/heads/feat", cwd=work)
    assert git("ls-remote", f"{dev_server.url}/{REPO}+ephemeral.git").stdout.strip().endswith("refs/heads/feat")
    assert git("push", "origin", "HEAD:main", cwd=work, check=False).returncode != 0


def test_no_token_or_key_is_left_anywhere_after_clone_fetch_and_push(configured: DevServer, tmp_path: Path, hermetic: Path) -> None:
    # Threat: the token or key leaking into .git, the home directory, server logs,
    # git's traces, or any process's argv.
    trace = tmp_path / "trace"
    url = f"{configured.url}/{REPO}.git"
    clone = tmp_path / "clone"
    outputs, sampler = run_git_traced([
        (["clone", url, str(clone)], None),
        (["-c", "user.name=T", "commit", "--allow-empty", "-m", "c"], clone),
        (["push", "origin", "HEAD:main"], clone),
        (["fetch", "origin"], clone),
        (["remote", "-v"], clone),
    ], trace, GIT_TRACE_SETUP=str(trace / "setup"))
    needles = key_needles(configured.key.pem)
    assert sampler.samples > 0 and sampler.hits == []
    assert "Authorization: Basic <redacted>" in (trace / "curl").read_text()  # the curl trace was really on
    assert files_with_secrets(trace, needles) == {}
    assert files_with_secrets(clone / ".git", needles) == {}
    assert files_with_secrets(hermetic, needles) == {}
    assert files_with_secrets(configured.data_dir, needles) == {}
    assert secrets_in_text("\n".join(outputs), needles) == []


def test_a_session_longer_than_many_ttls_keeps_working(clocked_server: tuple[DevServer, Clock], tmp_path: Path) -> None:
    # git, the helpers and the dev server share one fake clock, which the test moves
    # forward sixty token lifetimes mid-session.
    server, clock = clocked_server
    run_cli("codestore", "setup")
    url = server.create_repo(REPO)
    work = tmp_path / "w"
    git("clone", "-q", url, str(work))
    fill = subprocess.run(["git", "credential", "fill"], input=f"url={url}\n\n", capture_output=True, text=True, check=True)
    old_token = dict(line.split("=", 1) for line in fill.stdout.splitlines())["password"]

    clock.set_offset(3600)  # an hour later: sixty 60-second lifetimes

    commit(work, "late.txt")
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    git("fetch", "-q", cwd=work)
    git("clone", "-q", url, str(tmp_path / "again"))
    assert (tmp_path / "again" / "late.txt").exists()
    # The clock really moved for the server: the first token is now refused.
    claims = jwt.decode(old_token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    refused = subprocess.run(
        ["git", "-c", "credential.helper=", "ls-remote", url],
        env=dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                 GIT_CONFIG_VALUE_0="Authorization: Bearer " + old_token),
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    expired = [r for r in server.requests() if "expired" in str(r.get("reason", ""))]
    assert expired, server.requests()[-3:]


def test_a_pre_push_hook_that_outlasts_the_token_is_named_as_the_cause(clocked_server: tuple[DevServer, Clock], tmp_path: Path) -> None:
    # git caches the credential helper's token for the whole process, so a hook longer
    # than the TTL makes the pack's POST fail; the helper sees git's erase after the 401,
    # with the token it gave, and says what happened instead of blaming key, org or clock.
    server, _ = clocked_server
    run_cli("codestore", "setup")
    url = server.create_repo(REPO)
    work = tmp_path / "w"
    git("init", "-q", str(work))
    commit(work, "first.txt")
    slow_pre_push_hook(work, 3600)
    proc = git("push", url, "HEAD:refs/heads/main", cwd=work, check=False)
    assert proc.returncode != 0
    assert "the token expired during the push: a hook or a slow step took longer than the TTL" in proc.stderr
    assert "CODESTORE_TTL" in proc.stderr and "codestore://" in proc.stderr


@pytest.mark.parametrize(
    "tracing",
    [
        {"GIT_TRACE_REDACT": "0", "GIT_TRACE_CURL": "1"},
        {"GIT_TRACE_REDACT": "0", "GIT_CURL_VERBOSE": "1"},
        {"GIT_TRACE_REDACT": "0", "GIT_TRACE_CURL": "/tmp/x"},
        # Spellings git reads as false (git_config_bool), and GIT_CURL_VERBOSE set at all:
        {"GIT_TRACE_REDACT": "00", "GIT_TRACE_CURL": "1"},
        {"GIT_TRACE_REDACT": "0x0", "GIT_TRACE_CURL": "true"},
        {"GIT_TRACE_REDACT": "-0", "GIT_TRACE_CURL": "/tmp/x"},
        {"GIT_TRACE_REDACT": "0k", "GIT_TRACE_CURL": "2"},
        {"GIT_TRACE_REDACT": " 0", "GIT_CURL_VERBOSE": "0"},
        {"GIT_TRACE_REDACT": "No", "GIT_CURL_VERBOSE": ""},
    ],
    ids=lambda e: " ".join(f"{k}={v!r}" for k, v in e.items()),
)
def test_no_token_is_handed_to_a_git_that_would_print_it_unredacted(configured: DevServer, tmp_path: Path, tracing: dict[str, str]) -> None:
    # Threat: GIT_TRACE_REDACT=0 (or 00, 0x0, -0, ...) makes git print the Authorization
    # header in curl traces, which agents paste into logs; the helper sees git's
    # environment, reads it exactly as git does, and refuses.
    trace = tmp_path / "curl"
    env = dict(os.environ, **{k: (str(trace) if v == "/tmp/x" else v) for k, v in tracing.items()})
    proc = subprocess.run(["git", "ls-remote", f"{configured.url}/{REPO}.git"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "GIT_TRACE_REDACT" in proc.stderr
    assert secrets_in_text(proc.stdout + proc.stderr + (trace.read_text() if trace.exists() else "")) == []


def test_tracing_with_redaction_on_still_works(configured: DevServer, tmp_path: Path) -> None:
    env = dict(os.environ, GIT_TRACE_CURL=str(tmp_path / "curl"), GIT_TRACE_REDACT="1")
    proc = subprocess.run(["git", "ls-remote", f"{configured.url}/{REPO}.git"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Authorization: Basic <redacted>" in (tmp_path / "curl").read_text()
