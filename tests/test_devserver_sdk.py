"""The contract with the official SDK: every public method of `pierre-storage`, driven
against `codestore dev-server`, either works with the answer Code Storage gives or gets
a clear 501 that names it. docs/dev-server.md holds the same table for people.

Real SDK, real server, real git; tokens are the SDK's own (no kid, `sub` @pierre/storage).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pierre_storage import GitStorage
from pierre_storage.repo import RepoImpl

from tests.conftest import ORG, DevServer, OrgKey, commit, git, start_dev_server

SIGNATURE = {"name": "T", "email": "t@example.com"}

# What the dev server does with each public method. "local": no request (URL or handle
# building); "works": served, with the shapes Code Storage answers; "501": refused, naming it.
CONTRACT: dict[str, str] = {
    # GitStorage
    "create_repo": "works",
    "list_repos": "works",
    "find_one": "works",
    "delete_repo": "works",
    "repo": "local",
    "get_config": "local",
    "get_default_api_base_url": "local",
    "get_default_storage_base_url": "local",
    "create_git_credential": "501",
    "update_git_credential": "501",
    "delete_git_credential": "501",
    # Repo
    "get_remote_url": "works",
    "get_ephemeral_remote_url": "works",
    "get_import_remote_url": "works",
    "get_file_stream": "works",
    "head_file": "works",
    "list_files": "works",
    "list_branches": "works",
    "create_branch": "works",
    "promote_ephemeral_branch": "works",
    "delete_branch": "works",
    "list_commits": "works",
    "get_branch_diff": "works",
    "get_archive_stream": "501",
    "list_files_with_metadata": "501",
    "merge": "501",
    "preview_merge": "501",
    "list_tags": "works",
    "create_tag": "501",
    "delete_tag": "501",
    "get_commit": "works",
    "get_blame": "501",
    "get_note": "501",
    "create_note": "501",
    "append_note": "501",
    "delete_note": "501",
    "list_notes_refs": "501",
    "get_commit_diff": "works",
    "grep": "501",
    "pull_upstream": "501",
    "restore_commit": "501",
    "create_commit": "501",
    "create_commit_from_diff": "501",
}


@dataclass
class Setup:
    server: DevServer
    storage: Any  # GitStorage
    repo: Any  # RepoImpl with main (2 commits) and ephemeral feat (1 more)
    work: Path
    main: str
    feat: str


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def http_url(sdk_url: str) -> str:
    # The SDK always writes https://; the dev server here is plain http on loopback.
    return "http://" + sdk_url.split("://", 1)[1]


def status_of(exc: BaseException) -> int | None:
    code = getattr(exc, "status_code", None)
    if code is None:
        code = getattr(getattr(exc, "response", None), "status_code", None)
    return code


@pytest.fixture
def sdk(tmp_path: Path, org_key: OrgKey) -> Iterator[Setup]:
    server = start_dev_server(tmp_path / "server", org_key)
    try:
        storage = GitStorage({"name": ORG, "key": org_key.pem, "api_base_url": server.url,
                              "storage_base_url": server.url.split("://", 1)[1]})
        repo = run(storage.create_repo(id="team/app"))
        work = tmp_path / "work"
        git("init", "-q", "-b", "main", str(work))
        commit(work, "a.txt", "hello\n", "edit a.txt")
        main = commit(work, "a.txt", "hello\nworld\n", "edit a.txt")
        git("push", "-q", http_url(run(repo.get_remote_url(ttl=300))), "main", cwd=work)
        feat = commit(work, "b.txt", "new\n", "edit b.txt")
        git("push", "-q", http_url(run(repo.get_ephemeral_remote_url(ttl=300))), "main:refs/heads/feat", cwd=work)
        yield Setup(server, storage, repo, work, main, feat)
    finally:
        server.stop()


def test_the_contract_names_every_public_method_of_the_sdk() -> None:
    public = {n for cls in (GitStorage, RepoImpl) for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}
    assert public == set(CONTRACT), f"new SDK methods: {public - set(CONTRACT)}; gone: {set(CONTRACT) - public}"


# ---- what works --------------------------------------------------------------------------


def test_find_one_finds_an_existing_repository_and_none_for_a_missing_one(sdk: Setup) -> None:
    found = run(sdk.storage.find_one(id="team/app"))
    assert found is not None and found.id == "team/app" and found.default_branch == "main" and found.created_at
    assert run(sdk.storage.find_one(id="team/missing")) is None


def test_list_repos_pages_with_has_more_exactly_when_there_is_a_next_cursor(sdk: Setup) -> None:
    for rid in ("team/b", "team/c"):
        run(sdk.storage.create_repo(id=rid))
    seen, cursor = [], None
    while True:
        page = run(sdk.storage.list_repos(limit=1, cursor=cursor))
        seen += [r["repo_id"] for r in page["repos"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == ["team/app", "team/b", "team/c"]


def test_list_repos_defaults_to_20_and_caps_at_100(sdk: Setup) -> None:
    for i in range(21):
        sdk.server.create_repo(f"bulk/r{i:02d}")
    assert len(run(sdk.storage.list_repos())["repos"]) == 20
    page = run(sdk.storage.list_repos(limit=1000))
    assert len(page["repos"]) == 22 and page["has_more"] is False


def test_delete_repo_deletes_and_then_it_is_not_found(sdk: Setup) -> None:
    result = run(sdk.storage.delete_repo(id="team/app"))
    assert result["repo_id"] == "team/app" and result["message"]
    assert run(sdk.storage.find_one(id="team/app")) is None
    with pytest.raises(Exception) as e:
        run(sdk.storage.delete_repo(id="team/app"))
    assert status_of(e.value) == 404


def test_list_branches_in_both_namespaces(sdk: Setup) -> None:
    main = run(sdk.repo.list_branches())
    eph = run(sdk.repo.list_branches(ephemeral=True))
    assert [(b["name"], b["head_sha"]) for b in main["branches"]] == [("main", sdk.main)]
    assert [(b["name"], b["head_sha"]) for b in eph["branches"]] == [("feat", sdk.feat)]
    assert main["has_more"] is False and main["next_cursor"] is None and main["branches"][0]["created_at"]


def test_list_commits_of_an_ephemeral_branch_newest_first_with_paging(sdk: Setup) -> None:
    first = run(sdk.repo.list_commits(branch="feat", ephemeral=True, limit=1))
    assert [c["sha"] for c in first["commits"]] == [sdk.feat] and first["has_more"] is True
    rest = run(sdk.repo.list_commits(branch="feat", ephemeral=True, cursor=first["next_cursor"]))
    assert [c["sha"] for c in rest["commits"]][0] == sdk.main and rest["has_more"] is False
    c = first["commits"][0]
    assert c["parent_shas"] == [sdk.main] and c["message"] == "edit b.txt" and c["author_email"] and c["date"].tzinfo


def test_branch_diff_across_namespaces_shows_what_the_sandbox_changed(sdk: Setup) -> None:
    diff = run(sdk.repo.get_branch_diff(branch="feat", base="main", ephemeral=True, ephemeral_base=False))
    assert diff["branch"] == "feat" and diff["base"] == "main" and diff["merge_base_sha"] == sdk.main
    assert diff["stats"] == {"files": 1, "additions": 1, "deletions": 0, "changes": 1}
    (f,) = diff["files"]
    assert f["path"] == "b.txt" and f["raw_state"] == "A" and "+new" in f["raw"] and f["bytes"] == len(f["raw"])


def test_get_file_at_a_ref_in_either_namespace(sdk: Setup) -> None:
    async def read(**kw: Any) -> bytes:
        resp = await sdk.repo.get_file_stream(**kw)
        try:
            return await resp.aread()
        finally:
            await resp.aclose()

    assert run(read(path="a.txt")) == b"hello\nworld\n"
    assert run(read(path="b.txt", ref="feat", ephemeral=True)) == b"new\n"
    with pytest.raises(Exception) as e:
        run(read(path="b.txt"))
    assert status_of(e.value) == 404


def test_head_file_gives_the_metadata_headers(sdk: Setup) -> None:
    meta = run(sdk.repo.head_file(path="a.txt"))
    blob = git("--git-dir", str(sdk.server.data_dir / "repos/team/app.git"), "rev-parse", "main:a.txt").stdout.strip()
    assert meta["status_code"] == 200 and meta["blob_sha"] == blob and meta["size"] == len(b"hello\nworld\n")
    assert meta["last_commit_sha"] == sdk.main and meta["etag"] == f'"{blob}"'
    again = run(sdk.repo.head_file(path="a.txt", headers={"if_none_match": meta["etag"]}))
    assert again["status_code"] == 304
    part = run(sdk.repo.head_file(path="a.txt", headers={"range": "bytes=0-4"}))
    assert part["status_code"] == 206 and part["content_range"] == "bytes 0-4/12"


def test_list_files(sdk: Setup) -> None:
    result = run(sdk.repo.list_files(ref="feat", ephemeral=True))
    assert result["paths"] == ["a.txt", "b.txt"] and result["ref"] == "feat"


def test_promote_then_delete_the_ephemeral_branch(sdk: Setup) -> None:
    promoted = run(sdk.repo.promote_ephemeral_branch(base_branch="feat"))
    assert promoted["target_branch"] == "feat" and promoted["commit_sha"] == sdk.feat and promoted["target_is_ephemeral"] is False
    deleted = run(sdk.repo.delete_branch(name="feat", ephemeral=True))
    assert deleted == {"name": "feat", "message": "branch deleted", "ephemeral": True}
    assert run(sdk.repo.list_branches(ephemeral=True))["branches"] == []
    assert [b["name"] for b in run(sdk.repo.list_branches())["branches"]] == ["feat", "main"]


def test_delete_branch_respects_the_ref_policy(sdk: Setup) -> None:
    # Threat: the REST API as a way around a no-force-push policy (deleting is history lost).
    with pytest.raises(Exception) as e:
        run(sdk.repo.delete_branch(name="feat", ephemeral=True, ref_policies=[{"pattern": "*", "ops": ["no-force-push"]}]))
    assert status_of(e.value) == 403
    assert [b["name"] for b in run(sdk.repo.list_branches(ephemeral=True))["branches"]] == ["feat"]


def test_create_branch_with_a_short_pattern_policy_is_refused_on_that_branch(sdk: Setup) -> None:
    # Threat: a short ref pattern (`release`) silently matching nothing.
    with pytest.raises(Exception) as e:
        run(sdk.repo.create_branch(base_ref="main", target_branch="release", ref_policies=[{"pattern": "release", "ops": ["no-push"]}]))
    assert status_of(e.value) == 403
    ok = run(sdk.repo.create_branch(base_ref="main", target_branch="other", ref_policies=[{"pattern": "release", "ops": ["no-push"]}]))
    assert ok["commit_sha"] == sdk.main


def test_remote_urls_work_with_git_in_all_three_namespaces(sdk: Setup) -> None:
    plain = git("ls-remote", http_url(run(sdk.repo.get_remote_url(permissions=["git:read"], ttl=300)))).stdout
    eph = git("ls-remote", http_url(run(sdk.repo.get_ephemeral_remote_url(permissions=["git:read"], ttl=300)))).stdout
    imp = git("push", "-q", http_url(run(sdk.repo.get_import_remote_url(ttl=300))), "main:refs/heads/imported", cwd=sdk.work)
    assert f"{sdk.main}\trefs/heads/main" in plain and f"{sdk.feat}\trefs/heads/feat" in eph
    assert imp.returncode == 0
    imported = git("ls-remote", http_url(run(sdk.repo.get_import_remote_url(permissions=["git:read"], ttl=300)))).stdout
    assert f"{sdk.feat}\trefs/heads/imported" in imported and "imported" not in plain + git("ls-remote", http_url(run(sdk.repo.get_remote_url(ttl=300)))).stdout


def test_the_legacy_ops_claim_refuses_a_force_push(sdk: Setup) -> None:
    # Threat: a token minted with ops=["no-force-push"] (the SDK's deprecated form) that the
    # dev server ignored, so a test passed here that Code Storage would fail.
    git("reset", "-q", "--hard", f"{sdk.main}~1", cwd=sdk.work)
    commit(sdk.work, "c.txt", "rewrite\n", "edit c.txt")  # not a descendant of main: a rewrite
    with pytest.warns(DeprecationWarning):
        url = http_url(run(sdk.repo.get_remote_url(ops=["no-force-push"], ttl=300)))
    proc = git("push", "--force", url, "HEAD:main", cwd=sdk.work, check=False)
    assert proc.returncode != 0 and "no-force-push" in proc.stderr and "denied by policy" in proc.stderr
    assert git("ls-remote", url, "refs/heads/main").stdout.split()[0] == sdk.main


def test_ref_policies_from_the_sdk_are_enforced_on_push(sdk: Setup) -> None:
    url = http_url(run(sdk.repo.get_remote_url(ttl=300, ref_policies=[{"pattern": "main", "ops": ["no-push"]}, {"pattern": "*"}])))
    assert git("push", url, "HEAD:main", cwd=sdk.work, check=False).returncode != 0
    assert git("push", "-q", url, "HEAD:refs/heads/elsewhere", cwd=sdk.work, check=False).returncode == 0


def test_create_repo_forks_a_repository_of_the_org(sdk: Setup) -> None:
    fork = run(sdk.storage.create_repo(id="team/fork", base_repo={"id": "team/app", "ref": "main"}))
    assert fork.default_branch == "main"
    assert run(sdk.storage.find_one(id="team/fork")) is not None
    heads = run(fork.list_branches())["branches"]
    assert [(b["name"], b["head_sha"]) for b in heads] == [("main", sdk.main)]


def test_create_repo_with_a_github_base_is_400_saying_it_cannot_be_honoured(sdk: Setup) -> None:
    with pytest.raises(Exception) as e:
        run(sdk.storage.create_repo(id="team/gh", base_repo={"owner": "octocat", "name": "hello", "auth": {"auth_type": "public"}}))
    assert status_of(e.value) == 400
    assert "cannot be honoured" in str(sdk.server.requests()[-1]["reason"])
    assert run(sdk.storage.find_one(id="team/gh")) is None


def test_list_repos_accepts_an_org_token_that_names_no_repository(sdk: Setup) -> None:
    from pierre_storage.auth import generate_jwt

    token = generate_jwt(sdk.server.key.pem, ORG, "org", scopes=["org:read", "git:read"], ttl=300)
    import jwt as pyjwt

    claims = pyjwt.decode(token, options={"verify_signature": False})
    del claims["repo"]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(sdk.server.key.pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    repo_less = pyjwt.encode(claims, key, algorithm="ES256")
    status, body = sdk.server.api("GET", "/api/v1/repos", repo_less)
    assert status == 200 and [r["repo_id"] for r in body["repos"]] == ["team/app"]
    # Threat: an org-wide token reading a repository.
    status, body = sdk.server.api("GET", "/api/v1/repo", repo_less)
    assert status == 401 and "names none" in str(body["error"])


def test_list_tags_peels_annotated_tags(sdk: Setup) -> None:
    url = http_url(run(sdk.repo.get_remote_url(ttl=300)))
    git("tag", "v1", sdk.main, cwd=sdk.work)
    git("tag", "-a", "-m", "release", "v2", sdk.main, cwd=sdk.work)
    git("push", "-q", url, "v1", "v2", cwd=sdk.work)
    page = run(sdk.repo.list_tags(limit=1))
    assert [(t["name"], t["sha"]) for t in page["tags"]] == [("v1", sdk.main)] and page["has_more"] is True
    rest = run(sdk.repo.list_tags(cursor=page["next_cursor"]))
    assert [(t["name"], t["sha"]) for t in rest["tags"]] == [("v2", sdk.main)] and rest["next_cursor"] is None


def test_get_commit_by_sha_short_sha_or_branch(sdk: Setup) -> None:
    for rev in (sdk.main, sdk.main[:10], "main"):
        c = run(sdk.repo.get_commit(sha=rev))["commit"]
        assert c["sha"] == sdk.main and c["message"] == "edit a.txt" and "signature" not in c


def test_get_commit_diff_against_the_parent_and_against_a_base(sdk: Setup) -> None:
    diff = run(sdk.repo.get_commit_diff(sha=sdk.main))
    assert diff["sha"] == sdk.main and diff["stats"] == {"files": 1, "additions": 1, "deletions": 0, "changes": 1}
    assert diff["files"][0]["path"] == "a.txt" and "+world" in diff["files"][0]["raw"]
    root = git("rev-list", "--max-parents=0", sdk.main, cwd=sdk.work).stdout.strip()
    first = run(sdk.repo.get_commit_diff(sha=root))
    assert first["files"][0]["raw_state"] == "A" and "base_sha" not in first
    against = run(sdk.repo.get_commit_diff(sha=sdk.main, base_sha=root))
    assert against["base_sha"] == root and against["merge_base_sha"] == root


# ---- what answers 501 ----------------------------------------------------------------------


def unimplemented(setup: Setup) -> dict[str, Callable[[], Coroutine[Any, Any, Any]]]:
    r, s = setup.repo, setup.storage

    async def send_commit() -> Any:
        return await r.create_commit(target_branch="main", commit_message="m", author=SIGNATURE).add_file_from_string("x", "y").send()

    return {
        "create_git_credential": lambda: s.create_git_credential(repo_id="team/app", password="p"),
        "update_git_credential": lambda: s.update_git_credential(id="c", password="p"),
        "delete_git_credential": lambda: s.delete_git_credential(id="c"),
        "get_archive_stream": lambda: r.get_archive_stream(),
        "list_files_with_metadata": lambda: r.list_files_with_metadata(),
        "merge": lambda: r.merge(source_branch="feat", target_branch="main", strategy="ff_only"),
        "preview_merge": lambda: r.preview_merge(source_branch="feat", target_branch="main"),
        "create_tag": lambda: r.create_tag(name="v1", target="main"),
        "delete_tag": lambda: r.delete_tag(name="v1"),
        "get_blame": lambda: r.get_blame(path="a.txt"),
        "get_note": lambda: r.get_note(sha=setup.main),
        "create_note": lambda: r.create_note(sha=setup.main, note="n"),
        "append_note": lambda: r.append_note(sha=setup.main, note="n"),
        "delete_note": lambda: r.delete_note(sha=setup.main),
        "list_notes_refs": lambda: r.list_notes_refs(),
        "grep": lambda: r.grep(pattern="x"),
        "pull_upstream": lambda: r.pull_upstream(),
        "restore_commit": lambda: r.restore_commit(target_branch="main", target_commit_sha=setup.main, author=SIGNATURE),
        "create_commit": send_commit,
        "create_commit_from_diff": lambda: r.create_commit_from_diff(target_branch="main", commit_message="m", diff="x", author=SIGNATURE),
    }


def test_every_unimplemented_method_gets_a_501_naming_it(sdk: Setup) -> None:
    calls = unimplemented(sdk)
    assert set(calls) == {n for n, what in CONTRACT.items() if what == "501"}
    for name, call in calls.items():
        before = len(sdk.server.requests())
        try:
            result = run(call())
            if hasattr(result, "aclose"):
                run(result.aclose())
        except Exception as e:  # noqa: BLE001 - the SDK raises ApiError, RefUpdateError or httpx errors
            assert status_of(e) in (501, None), (name, e)
        entries = sdk.server.requests()[before:]
        assert entries, f"{name} sent no request"
        assert entries[-1]["status"] == 501, (name, entries[-1])
        assert name in str(entries[-1]["reason"]) and "not implemented by codestore dev-server" in str(entries[-1]["reason"])


def test_the_docs_table_matches_the_contract() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "dev-server.md").read_text()
    for name, what in CONTRACT.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"docs/dev-server.md has no row for {name}"
        assert {"works": "works", "501": "501", "local": "no request"}[what] in row, row


def test_no_sdk_call_left_a_traceback_on_the_server(sdk: Setup) -> None:
    for call in unimplemented(sdk).values():
        try:
            run(call())
        except Exception:  # noqa: BLE001
            pass
    sdk.server.proc.terminate()
    sdk.server.proc.wait(timeout=10)
    assert "Traceback" not in (sdk.server.proc.stderr.read() if sdk.server.proc.stderr else "")


@pytest.mark.parametrize("prefix", ["/api/v1/repos", "/api/repos/team%2Fapp"])
def test_both_route_spellings_reach_the_same_endpoint(sdk: Setup, prefix: str) -> None:
    token = sdk.server.token("team/app", ["git:read"])
    status, body = sdk.server.api("GET", f"{prefix}/branches?ephemeral=true", token)
    assert status == 200 and [b["name"] for b in body["branches"]] == ["feat"]


def test_versionless_find_and_delete_use_the_encoded_id(sdk: Setup) -> None:
    read = sdk.server.token("team/app", ["git:read"])
    status, body = sdk.server.api("GET", "/api/repos/team%2Fapp", read)
    assert status == 200 and body["repo_id"] == "team/app"
    assert sdk.server.api("DELETE", "/api/repos/team%2Fapp", sdk.server.token("team/app", ["repo:write"]))[0] == 200
    assert sdk.server.api("GET", "/api/repos/team%2Fapp", read)[0] == 404


def test_a_versionless_path_naming_another_repository_is_refused(sdk: Setup) -> None:
    # Threat: a token for one repository used on another by naming it in the path.
    sdk.server.create_repo("team/other")
    status, body = sdk.server.api("GET", "/api/repos/team%2Fother/branches", sdk.server.token("team/app", ["git:read"]))
    assert status == 403 and "wrong repo" in str(body["error"])


@pytest.mark.parametrize("raw_id", ["team%2F..%2Fapp", "team%252Fapp", "%2e%2e", "team%2F", "team%zz"])
def test_encoded_ids_that_are_not_repository_ids_are_400(sdk: Setup, raw_id: str) -> None:
    # Threat: an encoded `..` or double encoding reaching another directory.
    status, _ = sdk.server.api("GET", f"/api/repos/{raw_id}/branches", sdk.server.token("team/app", ["git:read"]))
    assert status == 400


def test_an_unknown_field_is_400_naming_it(sdk: Setup) -> None:
    status, body = sdk.server.api("POST", "/api/v1/repos/branches/create", sdk.server.token("team/app", ["git:write"]),
                                  {"base_ref": "main", "target_branch": "x", "squash": True})
    assert status == 400 and "'squash' is not supported" in str(body["error"])


def test_create_branch_force_moves_an_existing_branch(sdk: Setup) -> None:
    write = sdk.server.token("team/app", ["git:write"])
    body: dict[str, object] = {"base_ref": "feat", "base_is_ephemeral": True, "target_branch": "main"}
    assert sdk.server.api("POST", "/api/v1/repos/branches/create", write, body)[0] == 409
    status, result = sdk.server.api("POST", "/api/v1/repos/branches/create", write, {**body, "force": True})
    assert status == 200 and result["commit_sha"] == sdk.feat
    assert run(sdk.repo.list_branches())["branches"][0]["head_sha"] == sdk.feat


def test_create_branch_force_backwards_is_refused_under_no_force_push(sdk: Setup) -> None:
    # Threat: `force` as a way to rewrite a branch the token may only fast-forward.
    first = git("rev-list", "--max-parents=0", "HEAD", cwd=sdk.work).stdout.strip()
    with pytest.raises(Exception) as e:
        run(sdk.repo.create_branch(base_ref=first, target_branch="main", ref_policies=[{"pattern": "*", "ops": ["no-force-push"]}]))
    assert status_of(e.value) == 409  # without force: never moves
    from pierre_storage.auth import generate_jwt

    token = generate_jwt(sdk.server.key.pem, ORG, "team/app", scopes=["git:write"], ttl=300, refs=[{"pattern": "*", "ops": ["no-force-push"]}])
    status, _ = sdk.server.api("POST", "/api/v1/repos/branches/create", token, {"base_ref": first, "target_branch": "main", "force": True})
    assert status == 403


def test_a_message_holding_git_logs_old_separators_and_a_path_that_looks_like_pathspec_magic(sdk: Setup) -> None:
    # A commit message with 0x1e (the dev server's record separator) made every commit
    # endpoint on its history a 500; a `path` of ":(bogus)x" was git's fatal error (a 500),
    # and ":(exclude)x" or "*" changed what was listed: a path is a path.
    odd = commit(sdk.work, "c.txt", "c\n", "hello\x1eworld\x1fagain")
    git("push", "-q", http_url(run(sdk.repo.get_ephemeral_remote_url(ttl=300))), "main:refs/heads/odd", cwd=sdk.work)
    listed = run(sdk.repo.list_commits(branch="odd", ephemeral=True, limit=2))
    assert [c["sha"] for c in listed["commits"]] == [odd, sdk.feat] and listed["commits"][0]["message"] == "hello\x1eworld\x1fagain"
    assert run(sdk.repo.list_commits(branch="odd", ephemeral=True, path="c.txt"))["commits"][0]["sha"] == odd
    for path in (":(bogus)x", ":(exclude)c.txt", "*", "c*"):
        assert run(sdk.repo.list_commits(branch="odd", ephemeral=True, path=path))["commits"] == [], path
