"""End to end through git-remote-codestore: real git, the real dev server, `codestore://` URLs.

The server's request log is the witness: every fetch-type request must carry a token
without `git:write`, every push request one with it.
"""

from __future__ import annotations

import http.server
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ORG, Clock, DevServer, commit, git, run_cli, slow_pre_push_hook
from tests.leakscan import files_with_secrets, key_needles, run_git_traced, secrets_in_text
from tests.realparts import recording_host, serve_in_thread

REPO = "team/app"
URL = f"codestore://{ORG}/{REPO}"
EPHEMERAL_URL = f"codestore://{ORG}/{REPO}+ephemeral"


def remote_refs(url: str) -> dict[str, str]:
    lines = git("ls-remote", url).stdout.splitlines()
    return {ref: sha for sha, ref in (line.split("\t") for line in lines)}


def git_requests(server: DevServer, service: str, since: int = 0) -> list[dict[str, Any]]:
    return [r for r in server.requests()[since:] if r.get("service") == service]


@pytest.fixture
def served(dev_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> DevServer:
    """team/app on the dev server; configuration allows writes to both namespaces."""
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    dev_server.create_repo(REPO)
    return dev_server


@pytest.fixture
def seeded(served: DevServer, tmp_path: Path) -> tuple[DevServer, Path]:
    """A working copy whose `origin` is codestore://acme/team/app, with `main` pushed."""
    work = tmp_path / "seed"
    git("init", "-q", str(work))
    commit(work, "README", "hello\n")
    git("remote", "add", "origin", URL, cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    return served, work


# ---------------------------------------------------------------- reading


def test_clone_gets_the_history_with_a_read_only_token(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, work = seeded
    before = len(server.requests())
    git("clone", "-q", URL, str(tmp_path / "c"))
    assert (tmp_path / "c" / "README").read_text() == "hello\n"
    reads = git_requests(server, "git-upload-pack", before)
    # Threat: a fetch receiving a token that can push, though configuration allows writing.
    assert reads and all(r["scopes"] == ["git:read"] and r["repo"] == REPO for r in reads)
    assert all(r["status"] == 200 for r in server.requests()[before:]), "no 401 round trip"


def test_fetch_and_pull_see_new_commits(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, work = seeded
    clone = tmp_path / "c"
    git("clone", "-q", URL, str(clone))
    head = commit(work, "two.txt")
    git("push", "-q", "origin", "main", cwd=work)
    before = len(server.requests())
    git("fetch", "-q", cwd=clone)
    assert git("rev-parse", "origin/main", cwd=clone).stdout.strip() == head
    git("pull", "-q", "--ff-only", cwd=clone)
    assert (clone / "two.txt").exists()
    reads = git_requests(server, "git-upload-pack", before)
    assert reads and all(r["scopes"] == ["git:read"] for r in reads)


@pytest.mark.parametrize("version", ["0", "1"])
def test_the_older_wire_protocols_clone_and_fetch_too(seeded: tuple[DevServer, Path], tmp_path: Path, version: str) -> None:
    # Protocol v0/v1 reach the helper as `list` and `fetch` commands, not stateless-connect.
    server, work = seeded
    clone = tmp_path / "c"
    before = len(server.requests())
    git("-c", f"protocol.version={version}", "clone", "-q", URL, str(clone))
    head = commit(work, "two.txt")
    git("push", "-q", "origin", "main", cwd=work)
    git("-c", f"protocol.version={version}", "fetch", "-q", cwd=clone)
    assert git("rev-parse", "origin/main", cwd=clone).stdout.strip() == head
    reads = git_requests(server, "git-upload-pack", before)
    assert reads and all(r["scopes"] == ["git:read"] for r in reads)


def test_ls_remote_lists_the_refs_with_a_read_only_token(seeded: tuple[DevServer, Path]) -> None:
    server, work = seeded
    before = len(server.requests())
    refs = remote_refs(URL)
    assert refs["refs/heads/main"] == git("rev-parse", "HEAD", cwd=work).stdout.strip()
    assert all(r["scopes"] == ["git:read"] for r in server.requests()[before:])


def test_the_codestore_double_colon_form_works_too(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, _ = seeded
    git("clone", "-q", f"codestore::{ORG}/{REPO}", str(tmp_path / "a"))
    git("clone", "-q", f"codestore::{server.url}/{REPO}.git", str(tmp_path / "b"))
    assert (tmp_path / "a" / "README").exists() and (tmp_path / "b" / "README").exists()


def test_a_shallow_single_branch_clone_has_one_commit_and_one_branch(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    _, work = seeded
    commit(work, "two.txt")
    git("push", "-q", "origin", "main", "main:other", cwd=work)
    clone = tmp_path / "c"
    git("clone", "-q", "--depth", "1", "--single-branch", URL, str(clone))
    assert git("rev-list", "--count", "HEAD", cwd=clone).stdout.strip() == "1"
    assert (clone / ".git" / "shallow").exists()
    assert "origin/other" not in git("branch", "-r", cwd=clone).stdout


def test_shallow_since_limits_history_by_date(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    _, work = seeded
    env = dict(os.environ, GIT_COMMITTER_DATE="2030-01-01T00:00:00Z", GIT_AUTHOR_DATE="2030-01-01T00:00:00Z")
    (work / "late.txt").write_text("late\n")
    git("add", "late.txt", cwd=work)
    git("commit", "-qm", "late", cwd=work, env=env)
    git("push", "-q", "origin", "main", cwd=work)
    clone = tmp_path / "c"
    git("clone", "-q", "--shallow-since=2029-01-01", URL, str(clone))
    assert git("rev-list", "--count", "HEAD", cwd=clone).stdout.strip() == "1"


def test_a_blobless_partial_clone_fetches_blobs_later_with_read_tokens(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, work = seeded
    commit(work, "big.txt", "b" * 10000)
    git("push", "-q", "origin", "main", cwd=work)
    clone = tmp_path / "c"
    before = len(server.requests())
    git("clone", "-q", "--filter=blob:none", "--no-checkout", URL, str(clone))
    missing = git("rev-list", "--objects", "--all", "--missing=print", cwd=clone).stdout
    assert any(line.startswith("?") for line in missing.splitlines()), "the server ignored the filter"
    git("checkout", "-q", "main", cwd=clone)  # a second helper process fetches the blobs
    assert (clone / "big.txt").read_text() == "b" * 10000
    reads = git_requests(server, "git-upload-pack", before)
    assert len(reads) >= 3 and all(r["scopes"] == ["git:read"] for r in reads)


def test_a_multi_megabyte_pack_arrives_intact(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    _, work = seeded
    data = os.urandom(6 * 1024 * 1024)
    (work / "blob.bin").write_bytes(data)
    git("add", "blob.bin", cwd=work)
    git("commit", "-qm", "blob", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    git("clone", "-q", URL, str(tmp_path / "c"))
    assert (tmp_path / "c" / "blob.bin").read_bytes() == data


# ---------------------------------------------------------------- pushing


def test_push_carries_a_write_token_and_fetch_does_not(seeded: tuple[DevServer, Path]) -> None:
    server, work = seeded
    head = commit(work, "two.txt")
    before = len(server.requests())
    git("push", "-q", "origin", "main", cwd=work)
    assert remote_refs(URL)["refs/heads/main"] == head
    pushes = git_requests(server, "git-receive-pack", before)
    assert pushes and all(r["scopes"] == ["git:read", "git:write"] and r["ephemeral"] is False for r in pushes)
    reads = git_requests(server, "git-upload-pack", before)
    assert reads and all("git:write" not in r["scopes"] for r in reads)


def test_force_push_rewrites_a_branch(seeded: tuple[DevServer, Path]) -> None:
    _, work = seeded
    commit(work, "two.txt")
    git("push", "-q", "origin", "main", cwd=work)
    git("reset", "-q", "--hard", "HEAD~1", cwd=work)
    rewritten = commit(work, "other.txt")
    assert git("push", "origin", "main", cwd=work, check=False).returncode != 0
    git("push", "-q", "--force", "origin", "main", cwd=work)
    assert remote_refs(URL)["refs/heads/main"] == rewritten


def test_push_tags_and_delete_a_branch(seeded: tuple[DevServer, Path]) -> None:
    _, work = seeded
    git("tag", "-a", "v1", "-m", "v1", cwd=work)
    git("push", "-q", "origin", "main:topic", cwd=work)
    git("push", "-q", "--tags", "origin", cwd=work)
    assert {"refs/tags/v1", "refs/heads/topic"} <= set(remote_refs(URL))
    git("push", "-q", "--delete", "origin", "topic", cwd=work)
    assert "refs/heads/topic" not in remote_refs(URL)


def test_an_atomic_push_updates_all_refs(seeded: tuple[DevServer, Path]) -> None:
    _, work = seeded
    head = commit(work, "two.txt")
    git("push", "-q", "--atomic", "origin", "main", "main:release", cwd=work)
    refs = remote_refs(URL)
    assert refs["refs/heads/main"] == refs["refs/heads/release"] == head


def test_the_ephemeral_namespace_is_separate_from_the_default_one(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, work = seeded
    head = commit(work, "eph.txt")
    before = len(server.requests())
    git("push", "-q", EPHEMERAL_URL, "HEAD:refs/heads/feat", cwd=work)
    assert remote_refs(EPHEMERAL_URL) == {"refs/heads/feat": head}
    assert "refs/heads/feat" not in remote_refs(URL)
    git("clone", "-q", "-b", "feat", EPHEMERAL_URL, str(tmp_path / "e"))
    assert (tmp_path / "e" / "eph.txt").exists()
    eph = [r for r in server.requests()[before:] if r.get("service")]
    pushes = [r for r in eph if r["service"] == "git-receive-pack"]
    reads = [r for r in eph if r["service"] == "git-upload-pack" and r["ephemeral"]]
    assert pushes and all(r["ephemeral"] and r["scopes"] == ["git:read", "git:write"] for r in pushes)
    assert reads and all(r["scopes"] == ["git:read"] for r in reads)


def test_push_to_the_default_namespace_is_refused_when_only_ephemeral_may_write(
    seeded: tuple[DevServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: an untrusted sandbox writing the default namespace.
    server, work = seeded
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read")
    monkeypatch.setenv("CODESTORE_EPHEMERAL_SCOPES", "git:read git:write")
    commit(work, "two.txt")
    before = len(server.requests())
    proc = git("push", "origin", "main", cwd=work, check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("codestore:")]
    assert len(ours) == 1 and "configuration forbids writing to team/app in the default namespace" in ours[0]
    assert "CODESTORE_SCOPES" in ours[0] and "+ephemeral" in ours[0]
    assert not git_requests(server, "git-receive-pack", before), "no token was minted, nothing was sent"
    git("push", "-q", EPHEMERAL_URL, "HEAD:refs/heads/feat", cwd=work)


# ---------------------------------------------------------------- secrets


def test_remote_v_shows_the_codestore_url_and_nothing_secret(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    git("clone", "-q", URL, str(tmp_path / "c"))
    out = git("remote", "-v", cwd=tmp_path / "c").stdout
    assert out == f"origin\t{URL} (fetch)\norigin\t{URL} (push)\n"


def test_no_token_in_argv_git_dir_or_traces_during_clone_and_push(
    seeded: tuple[DevServer, Path], tmp_path: Path, hermetic: Path
) -> None:
    # Threat: the token in another process's view (/proc/*/cmdline), in .git/, or in
    # GIT_TRACE / GIT_TRACE_CURL / GIT_TRACE_PACKET output that agents paste into logs.
    server, _ = seeded
    trace = tmp_path / "trace"
    clone = tmp_path / "clone"
    outputs, sampler = run_git_traced([
        (["clone", URL, str(clone)], None),
        (["commit", "--allow-empty", "-m", "c"], clone),
        (["push", "origin", "HEAD:main"], clone),
        (["push", EPHEMERAL_URL, "HEAD:refs/heads/feat"], clone),
        (["fetch", "origin"], clone),
    ], trace, GIT_TRACE_REDACT="0")  # even when a user (or an agent) asks git not to redact
    needles = key_needles(server.key.pem)
    assert sampler.samples > 0 and sampler.hits == []
    curl = (trace / "curl").read_text()
    assert "Authorization: Basic <redacted>" in curl  # the header was sent, and git redacted it
    assert "git-remote-codestore" in (trace / "trace").read_text()
    assert files_with_secrets(trace, needles) == {}
    assert files_with_secrets(clone / ".git", needles) == {}
    assert files_with_secrets(hermetic, needles) == {}
    assert secrets_in_text("\n".join(outputs), needles) == []


class _Redirect(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def redirector(served: DevServer) -> Iterator[str]:
    handler = type("Handler", (_Redirect,), {"target": served.url})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve_in_thread(httpd)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("config", [[], ["-c", "http.followRedirects=true"]])
def test_redirects_are_not_followed_with_the_token(served: DevServer, redirector: str, tmp_path: Path, config: list[str]) -> None:
    # Threat: a redirect carrying the Authorization header to another host.
    proc = git(*config, "clone", f"codestore::{redirector}/{REPO}.git", str(tmp_path / "c"), check=False)
    assert proc.returncode != 0
    assert not [r for r in served.requests() if r.get("service")], "the redirect was followed"


# ---------------------------------------------------------------- failures


def _one_codestore_line(stderr: str) -> str:
    ours = [line for line in stderr.splitlines() if line.startswith("codestore:")]
    assert len(ours) == 1, stderr
    assert "Traceback" not in stderr
    return ours[0]


def test_no_key_fails_in_one_line_without_hanging(served: DevServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CODESTORE_PRIVATE_KEY_FILE")
    proc = git("clone", URL, str(tmp_path / "c"), check=False)
    assert proc.returncode != 0
    line = _one_codestore_line(proc.stderr)
    assert "no private key" in line and "codestore key" in line
    assert not (tmp_path / "c").exists()


def test_an_unknown_repository_fails_cleanly(served: DevServer, tmp_path: Path) -> None:
    proc = git("clone", f"codestore://{ORG}/nope", str(tmp_path / "c"), check=False)
    assert proc.returncode == 128 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"codestore://{ORG}", "is not a codestore URL"),
        (f"codestore://{ORG}/a..b/../c", "is not a repository id"),
        (f"codestore://other/{REPO}", "not the configured org"),
        ("codestore::http://example.com/app.git", "refusing plain http"),
    ],
)
def test_a_bad_url_fails_in_one_line(served: DevServer, tmp_path: Path, url: str, message: str) -> None:
    proc = git("clone", url, str(tmp_path / "c"), check=False)
    assert proc.returncode != 0 and message in _one_codestore_line(proc.stderr)


def test_a_token_the_server_rejects_gets_the_401_hint(seeded: tuple[DevServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_KID", "unregistered")
    proc = git("clone", URL, str(tmp_path / "c"), check=False)
    assert proc.returncode == 128
    line = _one_codestore_line(proc.stderr)
    assert "HTTP 401" in line and "kid unregistered" in line


def test_an_unreachable_server_is_named(served: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_BASE_URL", "http://127.0.0.1:9")
    proc = git("ls-remote", URL, check=False)
    assert proc.returncode == 128 and "cannot reach http://127.0.0.1:9" in _one_codestore_line(proc.stderr)
    # One line, with curl's reason in it: git's `fatal: unable to access` said the same thing again.
    assert proc.stderr.count("\n") == 1 and "connect" in proc.stderr.lower(), proc.stderr


# ---------------------------------------------------------------- codestore clone, promote


def test_codestore_clone_is_shallow_and_can_push_to_ephemeral_only(seeded: tuple[DevServer, Path], tmp_path: Path) -> None:
    server, _ = seeded
    target = tmp_path / "sandbox"
    proc = run_cli("codestore", "clone", f"{ORG}/{REPO}", str(target), "--ephemeral-push")
    assert proc.returncode == 0, proc.stderr
    assert git("rev-list", "--count", "HEAD", cwd=target).stdout.strip() == "1"
    assert git("config", "remote.origin.pushurl", cwd=target).stdout.strip() == EPHEMERAL_URL
    head = commit(target, "agent.txt")
    git("push", "-q", "origin", "HEAD:refs/heads/agent", cwd=target)
    assert remote_refs(EPHEMERAL_URL)["refs/heads/agent"] == head
    assert "refs/heads/agent" not in remote_refs(URL)


def test_promote_copies_an_ephemeral_branch_into_the_default_namespace(seeded: tuple[DevServer, Path]) -> None:
    _, work = seeded
    head = commit(work, "feat.txt")
    git("push", "-q", EPHEMERAL_URL, "HEAD:refs/heads/feat", cwd=work)
    proc = run_cli("codestore", "promote", REPO, "feat", "--to", "feature")
    assert proc.returncode == 0, proc.stderr
    assert head in proc.stdout
    assert remote_refs(URL)["refs/heads/feature"] == head


def test_promote_of_a_missing_branch_fails_in_one_line(seeded: tuple[DevServer, Path]) -> None:
    proc = run_cli("codestore", "promote", REPO, "nope")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_promote_is_refused_when_configuration_forbids_default_writes(seeded: tuple[DevServer, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read")
    proc = run_cli("codestore", "promote", REPO, "feat")
    assert proc.returncode == 1 and "configuration forbids writing" in proc.stderr


# ---------------------------------------------------------------- long sessions


def test_a_session_longer_than_many_ttls_keeps_working(clocked_server: tuple[DevServer, Clock], tmp_path: Path) -> None:
    # Each git transport process gets a fresh token, so a 60 s TTL outlives no session
    # and still every operation an hour later works. git, the helper and the server share
    # one fake clock, moved forward mid-session.
    server, clock = clocked_server
    server.create_repo(REPO)
    work = tmp_path / "w"
    git("init", "-q", str(work))
    commit(work, "first.txt")
    git("remote", "add", "origin", URL, cwd=work)
    git("push", "-q", "origin", "main", cwd=work)

    clock.set_offset(3600)  # an hour later: sixty 60-second lifetimes

    commit(work, "late.txt")
    git("push", "-q", "origin", "main", cwd=work)
    git("fetch", "-q", cwd=work)
    git("clone", "-q", URL, str(tmp_path / "again"))
    assert (tmp_path / "again" / "late.txt").exists()


def test_a_pre_push_hook_that_outlasts_the_token_does_not_fail_the_push(clocked_server: tuple[DevServer, Clock], tmp_path: Path) -> None:
    # git asks for the advertisement, runs pre-push (a test suite, a linter) for as long
    # as it takes, then sends the pack: the pack's token is minted after the hook.
    server, _ = clocked_server
    server.create_repo(REPO)
    work = tmp_path / "w"
    git("init", "-q", str(work))
    head = commit(work, "first.txt")
    slow_pre_push_hook(work, 3600)  # an hour: sixty 60-second lifetimes
    git("push", "-q", URL, "HEAD:refs/heads/main", cwd=work)
    assert remote_refs(URL)["refs/heads/main"] == head
    # Two write tokens were minted, an hour apart, both accepted.
    pushes = [r for r in server.requests() if r.get("service") == "git-receive-pack"]
    assert pushes and all(r.get("status") == 200 for r in pushes), pushes


def test_nothing_to_push_mints_no_token_for_the_push(seeded: tuple[DevServer, Path]) -> None:
    server, work = seeded
    before = len(server.requests())
    proc = git("push", "origin", "main", cwd=work)
    assert "Everything up-to-date" in proc.stderr
    # Only the advertisement was fetched: no second transport, no pack.
    assert [r.get("path", "") for r in server.requests()[before:]] == ["/team/app.git/info/refs"], server.requests()[before:]


def test_a_download_from_outside_the_repository_gets_no_token(served: DevServer, tmp_path: Path) -> None:
    # Threat: `get URI PATH` (git's bundle URIs) ran the transport on URI, and the transport
    # sends the token with every request it makes: a bundle server elsewhere got it.
    import subprocess

    with recording_host("127.0.0.2", body=b"hello") as (port, seen):
        commands = f"capabilities\nget http://127.0.0.2:{port}/b.bundle {tmp_path / 'got'}\n\n"
        proc = subprocess.run(["git-remote-codestore", "origin", f"codestore://{ORG}/team/app"], input=commands,
                              capture_output=True, text=True, timeout=60)
        assert seen == [] and not (tmp_path / "got").exists()
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "outside the repository's URL" in proc.stderr, proc.stderr
