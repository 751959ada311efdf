"""`codestore repo list|delete` and `codestore branch list|delete` against the dev server's REST API.

Shapes are Code Storage's (the official SDK's routes): GET /api/v1/repos pages with
`cursor`/`limit` and answers `{repos, next_cursor, has_more}`; branches likewise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from git_credential_codestore import api
from git_credential_codestore.errors import RemoteError
from git_credential_codestore.secrets import Token
from tests.conftest import ORG, DevServer, git, new_repo, run_cli
from tests.realparts import http_server, send_json

REPO = "team/app"


def test_repo_list_pages_through_every_repository(dev_server: DevServer) -> None:
    names = sorted(f"team/r{i:03d}" for i in range(205))
    for name in names:
        dev_server.create_repo(name)
    proc = run_cli("codestore", "repo", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["repo_id"] for r in json.loads(proc.stdout)] == names
    pages = [r for r in dev_server.requests() if r.get("method") == "GET" and str(r.get("path", "")).startswith("/api/v1/repos")]
    assert len(pages) == 3  # 100 + 100 + 5: Code Storage's maximum page size, every page read
    human = run_cli("codestore", "repo", "list")
    assert human.stdout.splitlines()[-1] == "team/r204\tmain"


class _Pager(BaseHTTPRequestHandler):
    pages: dict[str, dict[str, object]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        cursor = parse_qs(urlsplit(self.path).query).get("cursor", [""])[0]
        send_json(self, self.pages[cursor])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pager_server() -> Iterator[tuple[str, type[_Pager]]]:
    handler = type("Pager", (_Pager,), {"pages": {}})
    with http_server(handler) as url:
        yield url, handler


def test_paging_follows_has_more_not_just_a_cursor(pager_server: tuple[str, type[_Pager]]) -> None:
    url, handler = pager_server
    handler.pages.update({
        "": {"repos": [{"repo_id": "a"}], "next_cursor": "c1", "has_more": True},
        "c1": {"repos": [{"repo_id": "b"}], "next_cursor": "c2", "has_more": False},  # a cursor, but no more
    })
    assert [r["repo_id"] for r in api.list_repos(url, Token("t", 0))] == ["a", "b"]


def test_a_server_that_repeats_a_cursor_is_an_error_not_a_loop(pager_server: tuple[str, type[_Pager]]) -> None:
    url, handler = pager_server
    handler.pages.update({
        "": {"repos": [{"repo_id": "a"}], "next_cursor": "c1", "has_more": True},
        "c1": {"repos": [{"repo_id": "b"}], "next_cursor": "c1", "has_more": True},
    })
    with pytest.raises(RemoteError, match="no new cursor"):
        api.list_repos(url, Token("t", 0))


# ---------------------------------------------------------------- branches and deletion


@pytest.fixture
def repo_with_branches(dev_server: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DevServer, str]:
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    dev_server.create_repo(REPO)
    w = tmp_path / "w"
    new_repo(w, "f", "f\n", "f")
    git("push", "-q", f"codestore://{ORG}/{REPO}", "main", cwd=w)
    git("push", "-q", f"codestore://{ORG}/{REPO}+ephemeral", "main:refs/heads/feat", cwd=w)
    return dev_server, git("rev-parse", "HEAD", cwd=w).stdout.strip()


def test_branch_list_shows_both_namespaces(repo_with_branches: tuple[DevServer, str]) -> None:
    _, sha = repo_with_branches
    proc = run_cli("codestore", "branch", "list", REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {(b["name"], b["ephemeral"], b["head_sha"]) for b in json.loads(proc.stdout)}
    assert rows == {("main", False, sha), ("feat", True, sha)}
    only = json.loads(run_cli("codestore", "branch", "list", REPO, "--namespace", "ephemeral", "--json").stdout)
    assert [b["name"] for b in only] == ["feat"]


def test_branch_delete_cleans_up_the_ephemeral_branch_only(repo_with_branches: tuple[DevServer, str]) -> None:
    proc = run_cli("codestore", "branch", "delete", REPO, "feat", "--ephemeral")
    assert proc.returncode == 0, proc.stderr
    assert git("ls-remote", f"codestore://{ORG}/{REPO}+ephemeral").stdout == ""
    assert "refs/heads/main" in git("ls-remote", f"codestore://{ORG}/{REPO}").stdout
    again = run_cli("codestore", "branch", "delete", REPO, "feat", "--ephemeral")
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "codestore branch list" in again.stderr


def test_repo_delete_removes_the_repository(repo_with_branches: tuple[DevServer, str]) -> None:
    proc = run_cli("codestore", "repo", "delete", REPO, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert REPO not in run_cli("codestore", "repo", "list").stdout
    again = run_cli("codestore", "repo", "delete", REPO, "--yes")
    assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
