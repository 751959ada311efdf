"""The dev server, end to end: real git, real `git http-backend`, real sockets on 127.0.0.1.

Tokens reach git only through its environment (`http.extraHeader` via GIT_CONFIG_*),
never argv or a URL, exactly as the remote helper hands them over.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import BIN, KID, ORG, DevServer, OrgKey, commit, git, make_key, start_dev_server, stop_process
from tests.realparts import raw_exchange


def all_at_once(commands: list[list[str]], env: dict[str, str], cwd: Path | None = None) -> list[int]:
    """Run the commands concurrently (one thread each); their exit codes, in order."""
    results = [-1] * len(commands)

    def run(i: int) -> None:
        results[i] = subprocess.run(commands[i], cwd=cwd, env=env, capture_output=True, timeout=120).returncode

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(commands))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

def auth_env(token: str) -> dict[str, str]:
    """git's environment carrying the token as an Authorization header (no 401 round trip)."""
    basic = base64.b64encode(f"t:{token}".encode()).decode()
    return {
        **os.environ,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
    }


def request(server: DevServer, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """A raw HTTP request: the path goes on the wire exactly as given."""
    u = urlsplit(server.url)
    assert u.hostname is not None
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def info_refs(server: DevServer, repo: str, token: str | None, service: str = "git-upload-pack") -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": "Basic " + base64.b64encode(f"t:{token}".encode()).decode()} if token else {}
    return request(server, "GET", f"/{repo}.git/info/refs?service={service}", headers)


def new_work(tmp_path: Path, name: str = "work") -> Path:
    work = tmp_path / name
    git("init", "-q", "-b", "main", str(work))
    return work


@pytest.fixture
def seeded(dev_server: DevServer, tmp_path: Path) -> tuple[DevServer, str, Path]:
    """Repository `team/app` with one commit on main, and the work tree that pushed it."""
    url = dev_server.create_repo("team/app")
    work = new_work(tmp_path)
    commit(work, "file.txt", "first", "first")
    git("push", "-q", url, "main", cwd=work, env=auth_env(dev_server.token("team/app", ["git:write"])))
    return dev_server, url, work


def sign(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    signing_input = f"{b64(header)}.{b64(claims)}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def claims_for(repo: str, scopes: list[str]) -> dict[str, object]:
    now = int(time.time())
    return {"iss": ORG, "sub": "x", "repo": repo, "scopes": scopes, "iat": now, "exp": now + 300}


# ---- the CLI contract ---------------------------------------------------------------------


def test_first_stdout_line_names_the_url_and_sigterm_stops_cleanly(dev_server: DevServer) -> None:
    assert dev_server.url.startswith("http://127.0.0.1:")
    dev_server.proc.terminate()
    assert dev_server.proc.wait(timeout=10) == 0
    assert "Traceback" not in (dev_server.proc.stderr.read() if dev_server.proc.stderr else "")


def test_plain_http_on_a_non_loopback_address_is_refused(org_key: OrgKey) -> None:
    # Threat: tokens sent in clear over a network.
    proc = subprocess.run(
        [os.path.join(BIN, "codestore"), "dev-server", "--host", "0.0.0.0", "--port", "0", "--trust-key", str(org_key.public_path)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("codestore: refusing plain HTTP") and "--tls" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_port_in_use_is_a_one_line_error(dev_server: DevServer, org_key: OrgKey, tmp_path: Path) -> None:
    port = str(urlsplit(dev_server.url).port)
    proc = subprocess.run(
        [os.path.join(BIN, "codestore"), "dev-server", "--port", port, "--data-dir", str(tmp_path / "d2"),
         "--trust-key", str(org_key.public_path)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("codestore: cannot listen") and proc.stderr.count("\n") == 1


# ---- git through http-backend -------------------------------------------------------------


def test_clone_with_a_read_token_gets_the_pushed_history(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, work = seeded
    git("clone", "-q", url, str(tmp_path / "clone"), env=auth_env(server.token("team/app", ["git:read"])))
    assert (tmp_path / "clone" / "file.txt").read_text() == "first"


def test_fetch_with_a_read_token_sees_new_commits(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, work = seeded
    read = auth_env(server.token("team/app", ["git:read"]))
    git("clone", "-q", url, str(tmp_path / "clone"), env=read)
    head = commit(work, "file.txt", "second", "second")
    git("push", "-q", url, "main", cwd=work, env=auth_env(server.token("team/app", ["git:write"])))
    git("fetch", "-q", "origin", cwd=tmp_path / "clone", env=read)
    assert git("rev-parse", "origin/main", cwd=tmp_path / "clone").stdout.strip() == head


def test_push_with_a_write_token_moves_the_branch(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    head = commit(work, "file.txt", "second", "second")
    git("push", "-q", url, "main", cwd=work, env=auth_env(server.token("team/app", ["git:write"])))
    assert git("ls-remote", url, "refs/heads/main", env=auth_env(server.token("team/app", ["git:read"]))).stdout.split()[0] == head


def test_push_with_a_read_only_token_is_refused_with_403(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a fetch credential used to change the repository.
    server, url, work = seeded
    commit(work, "file.txt", "second", "second")
    proc = git("push", url, "main", cwd=work, env=auth_env(server.token("team/app", ["git:read"])), check=False)
    assert proc.returncode != 0 and "403" in proc.stderr
    status, _, body = info_refs(server, "team/app", server.token("team/app", ["git:read"]), "git-receive-pack")
    assert status == 403 and "missing scope git:write" in body


def test_unknown_repository_is_404_with_a_clear_body(dev_server: DevServer) -> None:
    status, _, body = info_refs(dev_server, "nope", dev_server.token("nope", ["git:read"]))
    assert status == 404 and "repository 'nope' does not exist" in body


def test_dumb_http_is_not_served(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: file-serving of the repository directory bypassing upload-pack and namespaces.
    server, _, _ = seeded
    tok = "Basic " + base64.b64encode(f"t:{server.token('team/app', ['git:read'])}".encode()).decode()
    for path in ("/team/app.git/info/refs", "/team/app.git/HEAD", "/team/app.git/objects/info/packs"):
        assert request(server, "GET", path, {"Authorization": tok})[0] == 404


def test_concurrent_clones_all_succeed(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, _ = seeded
    env = auth_env(server.token("team/app", ["git:read"]))
    assert all_at_once([["git", "clone", "-q", url, str(tmp_path / f"c{i}")] for i in range(8)], env) == [0] * 8


def test_a_multi_megabyte_push_streams_through(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, work = seeded
    # Incompressible and above http.postBuffer (1 MiB): git sends it chunked.
    head = commit(work, "big.bin", os.urandom(4 * 1024 * 1024), "big")
    git("push", "-q", url, "main", cwd=work, env=auth_env(server.token("team/app", ["git:write"])))
    git("clone", "-q", url, str(tmp_path / "clone"), env=auth_env(server.token("team/app", ["git:read"])))
    assert git("rev-parse", "HEAD", cwd=tmp_path / "clone").stdout.strip() == head
    assert (tmp_path / "clone" / "big.bin").stat().st_size == 4 * 1024 * 1024


# ---- authentication and authorization ------------------------------------------------------


def test_no_credentials_get_401_with_a_basic_challenge(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: anonymous access; the challenge is what makes git ask its credential helper.
    server, _, _ = seeded
    status, headers, body = info_refs(server, "team/app", None)
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Code Storage"'
    assert "authentication required" in body


def test_an_expired_token_is_refused_saying_expired(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a leaked token used after its lifetime.
    from git_credential_codestore import keys, tokens

    server, _, _ = seeded
    key = keys.parse_private_key(keys.Secret(server.key.pem), "test")
    old = tokens.mint(key, org=ORG, repo="team/app", scopes=["git:read"], ttl=60, sub="t", kid=KID, now=int(time.time()) - 3600)
    status, _, body = info_refs(server, "team/app", old.reveal())
    assert status == 401 and "expired" in body


def test_a_token_for_another_repository_is_refused(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a token for one repository used on another.
    server, _, _ = seeded
    server.create_repo("other")
    status, _, body = info_refs(server, "team/app", server.token("other", ["git:write"]))
    assert status == 401 and "wrong repo" in body


def test_a_token_for_the_plain_repo_is_accepted_on_its_ephemeral_namespace(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    assert info_refs(server, "team/app+ephemeral", server.token("team/app", ["git:read"]))[0] == 200
    status, _, body = info_refs(server, "team/app+ephemeral", server.token("team/app+ephemeral", ["git:read"]))
    assert status == 401 and "wrong repo" in body


def test_a_token_signed_by_an_unregistered_key_is_refused(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    # Threat: anyone minting their own tokens.
    from git_credential_codestore import keys, tokens

    server, _, _ = seeded
    rogue = keys.parse_private_key(keys.Secret(make_key(tmp_path, name="rogue").pem), "rogue")
    tok = tokens.mint(rogue, org=ORG, repo="team/app", scopes=["git:read"], ttl=300, sub="x", kid=KID).reveal()
    status, _, body = info_refs(server, "team/app", tok)
    assert status == 401 and "signature" in body


def test_an_alg_none_token_is_refused(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: an unsigned token (`alg: none`) accepted as valid.
    server, _, _ = seeded
    tok = sign({"alg": "none", "typ": "JWT", "kid": KID}, claims_for("team/app", ["git:write"]), None)
    status, _, body = info_refs(server, "team/app", tok)
    assert status == 401 and "'none' is not accepted" in body


def test_an_hs256_token_keyed_with_the_public_key_is_refused(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: key confusion, HMAC keyed with the (public) verification key.
    server, _, _ = seeded
    public = server.key.public_path.read_bytes()
    tok = sign({"alg": "HS256", "typ": "JWT", "kid": KID}, claims_for("team/app", ["git:write"]), public)
    status, _, body = info_refs(server, "team/app", tok)
    assert status == 401 and "HS256" in body


def test_an_unknown_kid_is_refused(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a token naming a retired or never-registered key.
    from git_credential_codestore import keys, tokens

    server, _, _ = seeded
    key = keys.parse_private_key(keys.Secret(server.key.pem), "test")
    tok = tokens.mint(key, org=ORG, repo="team/app", scopes=["git:read"], ttl=300, sub="x", kid="retired").reveal()
    status, _, body = info_refs(server, "team/app", tok)
    assert status == 401 and "unknown kid 'retired'" in body
    # The label of a key trusted without a kid names no key a token may ask for.
    from git_credential_codestore.tokens import TokenError, verify

    with pytest.raises(TokenError, match="unknown kid"):
        verify(tokens.mint(key, org=ORG, repo="team/app", scopes=["git:read"], ttl=300, sub="x", kid="<org.pem>").reveal(),
               {"<org.pem>": key.public_key()}, org=ORG)


def test_a_token_from_another_org_is_refused(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a token minted for a different org with a shared key.
    from git_credential_codestore import keys, tokens

    server, _, _ = seeded
    key = keys.parse_private_key(keys.Secret(server.key.pem), "test")
    tok = tokens.mint(key, org="evil", repo="team/app", scopes=["git:read"], ttl=300, sub="x", kid=KID).reveal()
    status, _, body = info_refs(server, "team/app", tok)
    assert status == 401 and "issuer" in body


def test_bearer_tokens_are_accepted_for_git_too(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    headers = {"Authorization": f"Bearer {server.token('team/app', ['git:read'])}"}
    assert request(server, "GET", "/team/app.git/info/refs?service=git-upload-pack", headers)[0] == 200


def test_a_token_minted_by_the_official_sdk_is_accepted(seeded: tuple[DevServer, str, Path], tmp_path: Path, org_key: OrgKey) -> None:
    # The SDK sets no kid: with one trusted key that key verifies it.
    from pierre_storage.auth import generate_jwt

    server, url, _ = seeded
    tok = generate_jwt(org_key.pem, ORG, "team/app", scopes=["git:read"], ttl=300)
    git("clone", "-q", url, str(tmp_path / "clone"), env=auth_env(tok))
    assert (tmp_path / "clone" / "file.txt").exists()


def test_the_token_never_appears_in_the_log_or_error_bodies(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: tokens leaking into logs and error messages that people paste around.
    server, _, _ = seeded
    read = server.token("team/app", ["git:read"])
    wrong = server.token("other", ["git:read"])
    bodies = [
        info_refs(server, "team/app", read, "git-receive-pack")[2],
        info_refs(server, "team/app", wrong)[2],
        info_refs(server, "team/app", read + "x")[2],
        request(server, "GET", f"/{read}.git/info/refs?service=git-upload-pack")[2],
        request(server, "GET", f"/team/app.git/info/refs?service=git-upload-pack&t={read}", {"Authorization": f"Bearer {read}"})[2],
        request(server, "POST", "/api/v1/repos", {"Authorization": f"Bearer {read}"}, b"{}")[2],
    ]
    log = server.log_path.read_text()
    for secret in (read, wrong, read.split(".")[2], wrong.split(".")[2]):
        assert secret not in log
        assert all(secret not in b for b in bodies)
    entries = server.requests()
    assert entries and all({"time", "method", "path", "repo", "ephemeral", "service", "status", "scopes", "sub", "kid", "reason"} <= set(e) for e in entries)


def test_each_request_is_logged_with_its_decision(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    info_refs(server, "team/app", server.token("team/app", ["git:read"]), "git-receive-pack")
    last = server.requests()[-1]
    assert last["status"] == 403 and last["service"] == "git-receive-pack" and last["repo"] == "team/app"
    assert last["scopes"] == ["git:read"] and last["kid"] == KID and last["sub"] == "test"
    assert last["ephemeral"] is False and "missing scope git:write" in str(last["reason"])


# ---- ref policies --------------------------------------------------------------------------


def policy_token(server: DevServer, refs: list[list[object]]) -> str:
    from git_credential_codestore import keys, tokens, vocab

    key = keys.parse_private_key(keys.Secret(server.key.pem), "test")
    return tokens.mint(key, org=ORG, repo="team/app", scopes=["git:write"], ttl=300, sub="t", kid=KID, refs=vocab.ref_policy(refs)).reveal()


def test_no_push_refuses_any_update_of_a_matching_ref(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: an agent pushing straight to a protected branch.
    server, url, work = seeded
    commit(work, "file.txt", "second", "second")
    env = auth_env(policy_token(server, [["refs/heads/main", ["no-push"]]]))
    proc = git("push", url, "main", cwd=work, env=env, check=False)
    assert proc.returncode != 0
    assert "refs/heads/main: the token's ref policy forbids pushing to it (no-push)" in proc.stderr


def test_no_push_leaves_other_refs_pushable(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    env = auth_env(policy_token(server, [["refs/heads/main", ["no-push"]]]))
    git("push", "-q", url, "main:refs/heads/feature", cwd=work, env=env)


def test_first_matching_rule_wins_with_trailing_wildcards(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    env = auth_env(policy_token(server, [["refs/heads/feat/ok", []], ["refs/heads/feat/*", ["no-push"]]]))
    git("push", "-q", url, "main:refs/heads/feat/ok", cwd=work, env=env)
    assert git("push", url, "main:refs/heads/feat/other", cwd=work, env=env, check=False).returncode != 0


def test_no_force_push_allows_a_fast_forward(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    commit(work, "file.txt", "second", "second")
    git("push", "-q", url, "main", cwd=work, env=auth_env(policy_token(server, [["refs/heads/*", ["no-force-push"]]])))


def test_no_force_push_refuses_a_rewrite(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: history destroyed by a forced push.
    server, url, work = seeded
    git("commit", "-q", "--amend", "-m", "rewritten", cwd=work)
    env = auth_env(policy_token(server, [["refs/heads/*", ["no-force-push"]]]))
    proc = git("push", "--force", url, "main", cwd=work, env=env, check=False)
    assert proc.returncode != 0 and "non-fast-forward update (no-force-push)" in proc.stderr


def test_no_force_push_refuses_a_deletion(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a branch deleted, which is history lost like a forced push.
    server, url, work = seeded
    env = auth_env(policy_token(server, [["refs/heads/*", ["no-force-push"]]]))
    git("push", "-q", url, "main:refs/heads/tmp", cwd=work, env=env)
    proc = git("push", url, ":refs/heads/tmp", cwd=work, env=env, check=False)
    assert proc.returncode != 0 and "deleting it (no-force-push)" in proc.stderr


def test_policies_match_unnamespaced_names_in_the_ephemeral_namespace(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    eph = url.replace(".git", "+ephemeral.git")
    proc = git("push", eph, "main", cwd=work, env=auth_env(policy_token(server, [["refs/heads/main", ["no-push"]]])), check=False)
    assert proc.returncode != 0 and "refs/heads/main: the token's ref policy" in proc.stderr


# ---- the ephemeral namespace ---------------------------------------------------------------


def test_ephemeral_pushes_are_invisible_in_the_default_namespace(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    write = auth_env(server.token("team/app", ["git:write"]))
    commit(work, "file.txt", "agent work", "agent work")
    git("push", "-q", url.replace(".git", "+ephemeral.git"), "main:refs/heads/feat", cwd=work, env=write)
    assert "refs/heads/feat" not in git("ls-remote", url, env=write).stdout
    assert "refs/heads/feat" in git("ls-remote", url.replace(".git", "+ephemeral.git"), env=write).stdout


def test_default_namespace_refs_are_invisible_in_the_ephemeral_namespace(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, _ = seeded
    out = git("ls-remote", url.replace(".git", "+ephemeral.git"), env=auth_env(server.token("team/app", ["git:read"]))).stdout
    assert "refs/heads/main" not in out


def test_the_namespaces_share_objects(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, work = seeded
    write = auth_env(server.token("team/app", ["git:write"]))
    head = commit(work, "file.txt", "agent work", "agent work")
    git("push", "-q", url.replace(".git", "+ephemeral.git"), "main:refs/heads/feat", cwd=work, env=write)
    repo = server.data_dir / "repos" / "team" / "app.git"
    assert git("--git-dir", str(repo), "cat-file", "-t", head).stdout.strip() == "commit"
    assert git("--git-dir", str(repo), "rev-parse", "refs/namespaces/ephemeral/refs/heads/feat").stdout.strip() == head


def test_the_import_namespace_takes_the_base_token_and_keeps_its_own_refs(seeded: tuple[DevServer, str, Path]) -> None:
    # `+import` (the SDK's get_import_remote_url) is a namespace like `+ephemeral`, not a 404.
    server, url, work = seeded
    write = auth_env(server.token("team/app", ["git:write"]))
    head = commit(work, "file.txt", "imported history", "imported history")
    imp = url.replace(".git", "+import.git")
    git("push", "-q", imp, "main:refs/heads/imported", cwd=work, env=write)
    assert f"{head}\trefs/heads/imported" in git("ls-remote", imp, env=write).stdout
    assert "imported" not in git("ls-remote", url, env=write).stdout
    assert "imported" not in git("ls-remote", url.replace(".git", "+ephemeral.git"), env=write).stdout
    assert any(e.get("namespace") == "import" and e["status"] == 200 for e in server.requests())


def test_the_import_namespace_enforces_the_ref_policy(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a namespace where the token's ref policy does not reach.
    server, url, work = seeded
    proc = git("push", url.replace(".git", "+import.git"), "main", cwd=work, env=auth_env(policy_token(server, [["*", ["no-push"]]])), check=False)
    assert proc.returncode != 0 and "denied by policy" in proc.stderr


def test_a_verify_sig_rule_refuses_the_push_saying_the_dev_server_cannot_check_it(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: a push Code Storage would refuse (unsigned, under verify-sig) passing here.
    server, url, work = seeded
    commit(work, "file.txt", "unsigned", "unsigned")
    proc = git("push", url, "main", cwd=work, env=auth_env(policy_token(server, [["main", ["verify-sig"]]])), check=False)
    assert proc.returncode != 0 and "verify-sig" in proc.stderr and "cannot check" in proc.stderr


def test_short_ref_patterns_and_star_work_on_push(seeded: tuple[DevServer, str, Path]) -> None:
    # Code Storage reads `main` as refs/heads/main; the dev server used to refuse the token (401).
    server, url, work = seeded
    env = auth_env(policy_token(server, [["main", ["no-push"]], ["*", []]]))
    commit(work, "file.txt", "second", "second")
    assert git("push", url, "main", cwd=work, env=env, check=False).returncode != 0
    git("push", "-q", url, "main:refs/heads/other", cwd=work, env=env)


# ---- REST ------------------------------------------------------------------------------------


def test_create_repository_returns_201_then_409(dev_server: DevServer) -> None:
    tok = dev_server.token("team/new", ["repo:write"])
    status, body = dev_server.api("POST", "/api/v1/repos", tok, {"default_branch": "trunk"})
    assert status == 201 and body["repo_id"] == "team/new" and body["url"] == f"{dev_server.url}/team/new.git"
    assert dev_server.api("POST", "/api/v1/repos", tok, {"default_branch": "trunk"})[0] == 409
    head = (dev_server.data_dir / "repos" / "team" / "new.git" / "HEAD").read_text()
    assert head.strip() == "ref: refs/heads/trunk"


def test_create_repository_needs_repo_write(dev_server: DevServer) -> None:
    # Threat: a git token used to create repositories.
    status, body = dev_server.api("POST", "/api/v1/repos", dev_server.token("x", ["git:write"]), {})
    assert status == 403 and "missing scope repo:write" in str(body["error"])


def test_create_repository_refuses_a_body_id_other_than_the_claim(dev_server: DevServer) -> None:
    # Threat: a token for one id creating another.
    status, _ = dev_server.api("POST", "/api/v1/repos", dev_server.token("mine", ["repo:write"]), {"id": "theirs"})
    assert status == 403
    assert not (dev_server.data_dir / "repos" / "theirs.git").exists()


def test_list_repositories_with_org_read(dev_server: DevServer) -> None:
    dev_server.create_repo("b")
    dev_server.create_repo("team/a")
    status, body = dev_server.api("GET", "/api/v1/repos", dev_server.token("org", ["org:read"]))
    assert status == 200 and body["next_cursor"] is None
    assert [r["repo_id"] for r in body["repos"]] == ["b", "team/a"]
    assert body["repos"][0]["default_branch"] == "main" and body["repos"][0]["created_at"]


def test_list_repositories_needs_org_read(dev_server: DevServer) -> None:
    assert dev_server.api("GET", "/api/v1/repos", dev_server.token("org", ["git:read"]))[0] == 403


def test_promote_creates_a_branch_from_an_ephemeral_one(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    write = server.token("team/app", ["git:write"])
    head = commit(work, "file.txt", "agent work", "agent work")
    git("push", "-q", url.replace(".git", "+ephemeral.git"), "main:refs/heads/feat", cwd=work, env=auth_env(write))
    body = {"base_ref": "feat", "target_branch": "feat", "base_is_ephemeral": True, "target_is_ephemeral": False}
    status, result = server.api("POST", "/api/v1/repos/branches/create", write, body)
    assert status == 200 and result["commit_sha"] == head and result["target_branch"] == "feat"
    assert git("ls-remote", url, "refs/heads/feat", env=auth_env(write)).stdout.split()[0] == head
    # Repeating the same promotion is harmless.
    assert server.api("POST", "/api/v1/repos/branches/create", write, body)[0] == 200


def test_promote_refuses_to_move_an_existing_branch(seeded: tuple[DevServer, str, Path]) -> None:
    server, url, work = seeded
    write = server.token("team/app", ["git:write"])
    commit(work, "file.txt", "agent work", "agent work")
    git("push", "-q", url.replace(".git", "+ephemeral.git"), "main:refs/heads/feat", cwd=work, env=auth_env(write))
    body = {"base_ref": "feat", "target_branch": "main", "base_is_ephemeral": True}
    status, result = server.api("POST", "/api/v1/repos/branches/create", write, body)
    assert status == 409 and "already exists" in str(result["error"])


def test_promote_of_a_missing_base_is_404(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    body = {"base_ref": "nope", "target_branch": "x", "base_is_ephemeral": True}
    assert server.api("POST", "/api/v1/repos/branches/create", server.token("team/app", ["git:write"]), body)[0] == 404


def test_promote_respects_the_no_push_policy(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: the REST API as a way around the token's ref policy.
    server, _, _ = seeded
    body = {"base_ref": "main", "target_branch": "release", "base_is_ephemeral": False}
    status, _ = server.api("POST", "/api/v1/repos/branches/create", policy_token(server, [["refs/heads/release", ["no-push"]]]), body)
    assert status == 403


@pytest.mark.parametrize(("target", "status"), [(".hidden", 400), ("a.lock/b", 400), ("-x", 400), ("HEAD", 400), ("_x", 200), ("a./b", 200)])
def test_promote_takes_exactly_the_branch_names_git_takes(seeded: tuple[DevServer, str, Path], target: str, status: int) -> None:
    # The dev server's rule is vocab.validate_branch, the CLI's too: a name refused here is
    # one git refuses, and one git takes is never refused.
    server, _, _ = seeded
    body = {"base_ref": "main", "target_branch": target, "base_is_ephemeral": False}
    answer, result = server.api("POST", "/api/v1/repos/branches/create", server.token("team/app", ["git:write"]), body)
    assert answer == status, result
    if status == 400:
        assert "is not a branch name" in str(result["error"])


def test_promote_needs_git_write(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    body = {"base_ref": "main", "target_branch": "x"}
    assert server.api("POST", "/api/v1/repos/branches/create", server.token("team/app", ["git:read"]), body)[0] == 403


def test_api_errors_are_one_line_json(dev_server: DevServer) -> None:
    status, _, body = request(dev_server, "POST", "/api/v1/repos", {"Authorization": "Bearer nope"}, b"{}")
    assert status == 401 and body.count("\n") == 1 and "error" in json.loads(body)


def test_api_bodies_over_64_kib_are_refused(dev_server: DevServer) -> None:
    tok = dev_server.token("big", ["repo:write"])
    status, _, _ = request(dev_server, "POST", "/api/v1/repos", {"Authorization": f"Bearer {tok}"}, b" " * (65 * 1024))
    assert status == 413


def test_malformed_json_is_400(dev_server: DevServer) -> None:
    tok = dev_server.token("r", ["repo:write"])
    assert request(dev_server, "POST", "/api/v1/repos", {"Authorization": f"Bearer {tok}"}, b"{nope")[0] == 400


# ---- odd paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/team/../team/app.git/info/refs?service=git-upload-pack",  # traversal
        "/team//app.git/info/refs?service=git-upload-pack",  # empty component
        "/team%252fapp.git/info/refs?service=git-upload-pack",  # decoded once only
        "/team%2f..%2fother.git/info/refs?service=git-upload-pack",  # traversal, encoded
        "/team%2F%2Fapp.git/info/refs?service=git-upload-pack",  # empty component, encoded
        "/team/app%00.git/info/refs?service=git-upload-pack",
        "/team/app%ff.git/info/refs?service=git-upload-pack",  # not UTF-8
        "/team/app.git/../app.git/info/refs?service=git-upload-pack",
        "/./team/app.git/info/refs?service=git-upload-pack",
        "/team/app.git/info/refs?service=git-upload-archive",  # other services
        "/team/app.git/objects/info/packs",  # dumb protocol
        "/team/app.git/info/refs/?service=git-upload-pack",
        "/team/app.git/git-upload-pack",  # GET on a POST endpoint
        "/-x.git/info/refs?service=git-upload-pack",
        "/app.git/objects.git/info/refs?service=git-upload-pack",  # a repo inside a repo's directory
        "/api/v1/../v1/repos",
        "/api/repos/team%2Fapp/../x/branches",
        "/api/repos/team/app/branches",  # an id's `/` must be encoded: one path component
        "/api/repos/team%2F..%2Fx/branches",
        "/api/repos/team%252Fapp",  # decoded once only
        "/api/v1/repos/branches/",
        "/",
    ],
)
def test_odd_paths_are_rejected_not_normalised(seeded: tuple[DevServer, str, Path], path: str) -> None:
    # Threat: path tricks reaching a directory other than the authorised repository.
    server, _, _ = seeded
    tok = server.token("team/app", ["git:write"])
    status, _, _ = request(server, "GET", path, {"Authorization": f"Bearer {tok}"})
    assert status in (400, 404)


@pytest.mark.parametrize("path", ["/team%2fapp.git", "/team%2Fapp%2Bephemeral.git", "/%74eam/app.git"])
def test_a_percent_encoded_repository_id_is_served_as_code_storage_serves_it(seeded: tuple[DevServer, str, Path], path: str) -> None:
    # The credential helper decodes `team%2Fapp.git` and mints for team/app (Code Storage
    # reads encoded ids); the dev server answered 404, so such a clone failed here only.
    server, _, _ = seeded
    tok = server.token("team/app", ["git:read"])
    status, _, body = request(server, "GET", f"{path}/info/refs?service=git-upload-pack", {"Authorization": f"Bearer {tok}"})
    assert status == 200 and "service=git-upload-pack" in body, (status, body[:200])


def test_an_absolute_form_request_target_is_400(dev_server: DevServer) -> None:
    assert request(dev_server, "GET", "http://evil/team/app.git/info/refs")[0] == 400


# ---- TLS -------------------------------------------------------------------------------------


def test_tls_serves_https_that_git_clones_with_ssl_ca_info(tmp_path: Path, org_key: OrgKey) -> None:
    server = start_dev_server(tmp_path / "tls-server", org_key, "--tls")
    try:
        assert server.url.startswith("https://127.0.0.1:")
        ca = server.data_dir / "tls" / "ca.pem"
        assert ca.exists()
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(ca))
        req = urllib.request.Request(
            server.url + "/api/v1/repos", method="POST", data=b"{}",
            headers={"Authorization": f"Bearer {server.token('secure', ['repo:write'])}"},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            assert r.status == 201
        work = new_work(tmp_path)
        commit(work, "file.txt", "over tls", "over tls")
        env = auth_env(server.token("secure", ["git:write"]))
        env.update(GIT_CONFIG_COUNT="2", GIT_CONFIG_KEY_1="http.sslCAInfo", GIT_CONFIG_VALUE_1=str(ca))
        git("push", "-q", f"{server.url}/secure.git", "main", cwd=work, env=env)
        git("clone", "-q", f"{server.url}/secure.git", str(tmp_path / "clone"), env=env)
        assert (tmp_path / "clone" / "file.txt").read_text() == "over tls"
    finally:
        server.stop()


def test_the_default_namespace_cannot_push_into_the_ephemeral_one(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: bypassing `refs/heads/*` policies by naming the namespaced ref directly.
    server, url, work = seeded
    env = auth_env(server.token("team/app", ["git:write"]))
    proc = git("push", url, "main:refs/namespaces/ephemeral/refs/heads/main", cwd=work, env=env, check=False)
    assert proc.returncode != 0


# ---- robustness ------------------------------------------------------------------------------


def test_a_chunked_json_body_is_read_as_a_stream(dev_server: DevServer) -> None:
    tok = dev_server.token("chunky", ["repo:write"])
    body = b'{"default_branch": "main"}'
    data = (
        f"POST /api/v1/repos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"5\r\n" + body[:5] + b"\r\n" + b"%x\r\n" % len(body[5:]) + body[5:] + b"\r\n0\r\n\r\n"
    assert raw_exchange(dev_server.address, data).startswith(b"HTTP/1.1 201")


@pytest.mark.parametrize("size", [b"zz", b"0x1a", b"+1a", b"0_1a", b" 1a ", b"\xd9\xa2"])  # int(x, 16) took all but the first and last
def test_a_malformed_chunked_body_is_400_and_the_server_keeps_serving(dev_server: DevServer, size: bytes) -> None:
    # A chunk size is hex digits alone: one a proxy in front reads otherwise opens a smuggled request.
    tok = dev_server.token("chunky", ["repo:write"])
    body = b'{"default_branch": "main"}'
    data = (
        f"POST /api/v1/repos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    assert raw_exchange(dev_server.address, data).startswith(b"HTTP/1.1 400")
    assert dev_server.api("POST", "/api/v1/repos", tok, {})[0] == 201


def test_a_refused_request_with_an_unread_body_closes_the_connection(seeded: tuple[DevServer, str, Path]) -> None:
    # Threat: request smuggling, an unread body parsed as the next request on a kept-alive connection.
    server, _, _ = seeded
    smuggled = b"GET /team/app.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (
        b"POST /team/app.git/git-upload-pack HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n" % len(smuggled)
    ) + smuggled
    out = raw_exchange(server.address, data)
    assert out.startswith(b"HTTP/1.1 401") and b"Connection: close" in out
    assert out.count(b"HTTP/1.1 ") == 1


def test_garbage_authorization_headers_are_401(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    for value in ("Basic ###", "Basic " + base64.b64encode(b"no-colon").decode(), "Digest x", "Bearer", "Basic \u00e9"):
        status, _, _ = request(server, "GET", "/team/app.git/info/refs?service=git-upload-pack", {"Authorization": value})
        assert status == 401, value


def test_sigint_stops_the_server_cleanly(dev_server: DevServer) -> None:
    import signal

    dev_server.proc.send_signal(signal.SIGINT)
    assert dev_server.proc.wait(timeout=10) == 0
    assert "Traceback" not in (dev_server.proc.stderr.read() if dev_server.proc.stderr else "")


def test_without_trust_key_the_configured_key_is_trusted(org_key: OrgKey, tmp_path: Path) -> None:
    # org_key configures CODESTORE_PRIVATE_KEY_FILE and CODESTORE_KID, as after `codestore key generate`.
    proc = subprocess.Popen(
        [os.path.join(BIN, "codestore"), "dev-server", "--port", "0", "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("codestore dev-server: serving http://127.0.0.1:"), line
        server = DevServer(line.split("serving ", 1)[1].split()[0], tmp_path / "d", tmp_path / "d" / "requests.log", proc, org_key)
        assert server.api("POST", "/api/v1/repos", server.token("r", ["repo:write"]), {})[0] == 201
        assert f"org {ORG}, keys {KID}," in line
    finally:
        stop_process(proc)


def test_a_failing_http_backend_is_a_one_line_500(seeded: tuple[DevServer, str, Path]) -> None:
    server, _, _ = seeded
    (server.data_dir / "repos" / "team" / "app.git" / "config").write_text("[[[ not git config\n")
    status, _, body = info_refs(server, "team/app", server.token("team/app", ["git:read"]))
    assert status == 500 and body.count("\n") == 1 and "http-backend" in body
    assert server.proc.poll() is None


def test_concurrent_pushes_to_different_branches_all_land(seeded: tuple[DevServer, str, Path], tmp_path: Path) -> None:
    server, url, work = seeded
    env = auth_env(server.token("team/app", ["git:write"]))
    assert all_at_once([["git", "push", "-q", url, f"main:refs/heads/b{i}"] for i in range(6)], env, cwd=work) == [0] * 6
    refs = git("ls-remote", url, env=env).stdout
    assert all(f"refs/heads/b{i}" in refs for i in range(6))


def test_sigterm_during_traffic_still_stops_the_server(dev_server: DevServer) -> None:
    # A signal that lands while a connection is being accepted must not be swallowed.
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                request(dev_server, "GET", "/nope")
            except OSError:
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    dev_server.proc.terminate()
    try:
        assert dev_server.proc.wait(timeout=10) == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
