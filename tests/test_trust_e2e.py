"""Secretless sandboxes, end to end: real git, both helpers, the agent, the dev server, and
a real OIDC issuer on loopback (HTTPS, test CA) playing Modal and GitHub Actions.

The sandbox's environment holds no key and no grant: only CODESTORE_AGENT_URL and the
identity its provider gave it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DevServer, OrgKey, commit, git
from tests.leakscan import files_with_secrets
from tests.oidc_issuer import CertAuthority, Issuer, SigningKey, new_key, start_issuer
from tests.test_agent import REPO, Agent, sandbox_env, start_agent
from tests.test_agent_e2e import push_new_branch, seed_repo

MODAL_POLICY = ("--audience", "oidc.modal.com", "--claim", "workspace_id=ac-12345abcd", "--claim", "app_name=agent-*",
                "--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only",
                "--sub-template", "modal:{workspace_id}/{app_name}/{container_id}", "--max-identity-lifetime", "2d")


@dataclass
class World:
    server: DevServer
    agent: Agent
    issuer: Issuer
    ca: CertAuthority

    def trust(self, *args: str, issuer: Issuer | None = None) -> dict[str, Any]:
        proc = self.agent.cli("trust", "add", "--json", "--issuer", (issuer or self.issuer).url, *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def sandbox(self, **identity: str) -> dict[str, str]:
        env = sandbox_env(url=self.agent.url, **identity)
        for name in ("CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_PRIVATE_KEY", "CODESTORE_GRANT", "CODESTORE_GRANT_FILE", "CODESTORE_SCOPES"):
            assert name not in env
        return env

    def exchanges(self) -> list[dict[str, Any]]:
        return [e for e in self.agent.audit() if e.get("issuer") and e["event"] in ("mint", "refuse")]


@pytest.fixture
def world(tmp_path: Path, dev_server: DevServer, org_key: OrgKey, ca: CertAuthority, issuer: Issuer) -> Iterator[World]:
    """team/app with an ephemeral `base` branch; an agent that trusts the test CA for OIDC; an issuer."""
    seed_repo(dev_server, tmp_path)
    agent = start_agent(tmp_path, env=ca.agent_env())
    try:
        yield World(dev_server, agent, issuer, ca)
    finally:
        agent.stop()


def ls_remote(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "ls-remote", url], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_modal_sandbox_with_only_the_agent_url_and_its_identity_clones_and_pushes_to_ephemeral(world: World, tmp_path: Path) -> None:
    p = world.trust(*MODAL_POLICY)
    claims = world.issuer.modal_claims()
    token = world.issuer.sign(claims)
    env = world.sandbox(MODAL_IDENTITY_TOKEN=token)
    url = f"{world.server.url}/{REPO}+ephemeral.git"
    work = tmp_path / "work"
    push_new_branch(url, work, env, "feat")
    workload = f"modal:ac-12345abcd/agent-runner/{claims['container_id']}"
    mints = [e for e in world.exchanges() if e["event"] == "mint"]
    assert mints and all(
        e["policy"] == p["id"] and e["issuer"] == world.issuer.url and e["subject"] == claims["sub"]
        and e["claims"] == {"workspace_id": "ac-12345abcd", "app_name": "agent-runner"} and e["sub"] == workload and e["ephemeral"]
        for e in mints
    )
    # Code Storage's own log (the dev server's here) says which workload pushed.
    assert {r["sub"] for r in world.server.requests() if r.get("sub") and "feat" in json.dumps(r)} | {workload} == {workload}
    assert workload in {r.get("sub") for r in world.server.requests()}
    # Threat: the identity token left in the clone, the server's records or the agent's audit log.
    assert files_with_secrets(work / ".git", [token]) == {}
    assert files_with_secrets(world.server.data_dir, [token]) == {}
    assert token not in world.agent.audit_path.read_text()


def test_a_push_with_a_workload_identity_is_audited_under_the_workload_and_its_policy(world: World, tmp_path: Path) -> None:
    p = world.trust(*MODAL_POLICY)
    claims = world.issuer.modal_claims()
    token = world.issuer.sign(claims)
    env = world.sandbox(MODAL_IDENTITY_TOKEN=token)
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", f"codestore://acme/{REPO}+ephemeral", str(work), env=env)
    commit(work, "feat.txt", env=env)
    proc = git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=work, env=env)
    assert "not in the audit trail" not in proc.stderr, proc.stderr
    sha = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    listed = world.agent.cli("audit", "--json", "--event", "push")
    assert listed.returncode == 0, listed.stderr
    [push] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (push["grant"], push["policy"], push["issuer"], push["subject"]) == (None, p["id"], world.issuer.url, claims["sub"])
    assert push["sub"] == f"modal:ac-12345abcd/agent-runner/{claims['container_id']}"
    assert [(r["ref"], r["new"], r["result"]) for r in push["refs"]] == [("refs/heads/feat", sha, "ok")]
    assert token not in world.agent.audit_path.read_text()


def test_a_workload_identity_cannot_report_into_a_repository_its_policy_does_not_cover(world: World) -> None:
    # Threat: a workload pollutes the audit trail of a repository it may not touch.
    from git_credential_codestore.agent.client import Endpoint, call
    from git_credential_codestore.secrets import Secret

    world.trust(*MODAL_POLICY)
    token = world.issuer.sign(world.issuer.modal_claims())
    report = {"event": "push", "repo": "team/other", "ephemeral": True,
              "refs": [{"ref": "refs/heads/feat", "old": "0" * 40, "new": "a" * 40, "result": "ok"}]}
    status, reply = call(Endpoint.from_url(world.agent.url), "POST", "/v1/audit/report", report,
                         identity=Secret(token), env=world.agent.env)
    assert status == 403 and "team/other" in str(reply["error"])
    forged = world.issuer.sign(world.issuer.modal_claims(workspace_id="ac-someone-else"))
    status, _ = call(Endpoint.from_url(world.agent.url), "POST", "/v1/audit/report", {**report, "repo": REPO},
                     identity=Secret(forged), env=world.agent.env)
    assert status == 403
    assert [e for e in world.agent.audit() if e["event"] == "push"] == []


def test_a_github_actions_job_asks_for_the_agents_audience_and_pushes_through_codestore_urls(world: World, tmp_path: Path) -> None:
    world.trust("--audience", world.agent.url, "--claim", "repository=acme/app", "--claim", "ref=refs/heads/main",
                "--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only", "--sub-template", "github:{repository}@{ref}",
                "--ref-policy", "refs/heads/main=no-push")
    env = world.sandbox(
        ACTIONS_ID_TOKEN_REQUEST_URL=f"{world.issuer.url}/github/idtoken?api-version=2.0",
        ACTIONS_ID_TOKEN_REQUEST_TOKEN=world.issuer.github_request_token,
        SSL_CERT_FILE=str(world.ca.cert),  # the runner's endpoint is HTTPS; our stand-in's CA
    )
    work = tmp_path / "work"
    push_new_branch(f"codestore://acme/{REPO}+ephemeral", work, env, "ci")
    assert world.issuer.github_audiences and set(world.issuer.github_audiences) == {world.agent.url}
    mints = [e for e in world.exchanges() if e["event"] == "mint"]
    assert [e["sub"] for e in mints] == ["github:acme/app@refs/heads/main"] * len(mints)
    assert all(e["refs"] == [["refs/heads/main", ["no-push"]]] for e in mints)  # the policy's rules, in every token
    assert any("git:write" in e["scopes"] for e in mints) and any("git:write" not in e["scopes"] for e in mints)


def test_a_workload_whose_claims_do_not_match_gets_a_refusal_naming_the_condition_and_never_the_token(world: World) -> None:
    p = world.trust(*MODAL_POLICY)
    token = world.issuer.sign(world.issuer.modal_claims(workspace_id="ac-someone-else"))
    proc = ls_remote(f"{world.server.url}/{REPO}+ephemeral.git", world.sandbox(MODAL_IDENTITY_TOKEN=token))
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "refused" in ln]
    assert len(lines) == 1, proc.stderr
    assert f"trust policy {p['id']}: claim workspace_id is 'ac-someone-else', not ac-12345abcd" in lines[0], world.issuer.tls_errors
    assert "MODAL_IDENTITY_TOKEN" in lines[0]
    # Threat: the identity token echoed into git's output or the audit trail.
    assert token not in proc.stderr and token.split(".")[1] not in proc.stderr
    last = world.exchanges()[-1]
    assert last["event"] == "refuse" and last["subject"].startswith("modal:workspace_id:ac-someone-else")
    assert token not in world.agent.audit_path.read_text()


def test_the_sandbox_cannot_reach_the_default_namespace_under_an_ephemeral_only_policy(world: World) -> None:
    # Threat: a policy handing out more than the same grant would.
    world.trust(*MODAL_POLICY)
    env = world.sandbox(MODAL_IDENTITY_TOKEN=world.issuer.sign(world.issuer.modal_claims()))
    proc = ls_remote(f"{world.server.url}/{REPO}.git", env)
    assert proc.returncode != 0 and "is ephemeral-only" in proc.stderr


def test_a_removed_policy_stops_the_next_exchange_even_for_a_token_that_worked(world: World) -> None:
    # Threat: a replayed identity token after the owner withdrew trust.
    p = world.trust(*MODAL_POLICY)
    env = world.sandbox(MODAL_IDENTITY_TOKEN=world.issuer.sign(world.issuer.modal_claims()))
    url = f"{world.server.url}/{REPO}+ephemeral.git"
    assert ls_remote(url, env).returncode == 0
    removed = world.agent.cli("trust", "remove", str(p["id"]))
    assert removed.returncode == 0 and f"removed {p['id']}" in removed.stdout
    proc = ls_remote(url, env)
    assert proc.returncode != 0 and "no trust policy trusts identity tokens from" in proc.stderr


def test_a_token_from_one_policys_issuer_gets_nothing_under_another_issuers_policy(world: World, ca: CertAuthority) -> None:
    # Threat: issuer A's workload borrowing the permissions the owner gave issuer B's workloads.
    with start_issuer(ca) as other:
        world.trust("--audience", "oidc.modal.com", "--claim", "workspace_id=ac-12345abcd", "--repo", "team/other",
                    "--scopes", "git:read", issuer=other)
        world.trust(*MODAL_POLICY)  # the first issuer may only have team/app
        env = world.sandbox(MODAL_IDENTITY_TOKEN=world.issuer.sign(world.issuer.modal_claims()))
        proc = ls_remote(f"{world.server.url}/team/other.git", env)
        assert proc.returncode != 0 and "does not cover repository 'team/other'" in proc.stderr


def test_key_rotation_is_followed_and_an_issuer_outage_spares_cached_keys_but_not_unknown_ones(world: World) -> None:
    world.trust(*MODAL_POLICY)
    url = f"{world.server.url}/{REPO}+ephemeral.git"

    def fetch(key: SigningKey | None = None) -> subprocess.CompletedProcess[str]:
        return ls_remote(url, world.sandbox(MODAL_IDENTITY_TOKEN=world.issuer.sign(world.issuer.modal_claims(), key=key)))

    def works(proc: subprocess.CompletedProcess[str]) -> None:
        assert proc.returncode == 0, (proc.stderr, world.issuer.tls_errors)

    works(fetch())
    world.issuer.rotate()
    works(fetch())  # the new kid made the agent refetch the JWKS
    world.issuer.stop()
    works(fetch())  # issuer down: its cached key still verifies
    proc = fetch(new_key())
    assert proc.returncode != 0 and "does not publish" in proc.stderr  # an unknown kid fails closed


def test_trust_policies_are_listed_and_removed_from_the_cli(world: World) -> None:
    p = world.trust(*MODAL_POLICY)
    listed = json.loads(world.agent.cli("trust", "list", "--json").stdout)
    assert [x["id"] for x in listed] == [p["id"]] and listed[0]["claims"] == [["workspace_id", "ac-12345abcd"], ["app_name", "agent-*"]]
    text = world.agent.cli("trust", "list").stdout
    assert p["id"] in text and "workspace_id=ac-12345abcd" in text
    assert f"grants:  {REPO}  scopes git:read git:write  max ttl" in text
    assert world.agent.cli("trust", "remove", str(p["id"])).returncode == 0
    assert json.loads(world.agent.cli("trust", "list", "--json").stdout) == []
    events = [e["event"] for e in world.agent.audit()]
    assert "trust-add" in events and "trust-remove" in events


@pytest.mark.parametrize("args, message", [
    (("--audience", "x", "--repo", REPO), "at least one --claim"),
    (("--audience", "x", "--claim", "repo", "--repo", REPO), "--claim wants NAME=PATTERN"),
    (("--audience", "x", "--claim", "a=b", "--repo", REPO, "--max-ttl", "99999"), "--max-ttl"),
])
def test_a_bad_policy_is_one_line_naming_the_fix(world: World, args: tuple[str, ...], message: str) -> None:
    proc = world.agent.cli("trust", "add", "--issuer", world.issuer.url, *args)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("codestore: ") and message in proc.stderr


def test_trust_calls_are_refused_to_anyone_but_the_owner(world: World) -> None:
    # Threat: a sandbox adding a policy that trusts itself.
    from git_credential_codestore.agent.client import Endpoint, call

    status, reply = call(Endpoint.from_url(world.agent.url), "POST", "/v1/trust", {"issuer": world.issuer.url})
    assert status == 403 and "owner" in str(reply["error"])


def test_exchanging_an_identity_imports_no_jwt_or_crypto_in_the_helper(world: World, tmp_path: Path) -> None:
    # Startup is paid on every git request: the agent verifies the identity, the helper only forwards it.
    import sys

    world.trust(*MODAL_POLICY)
    code = (
        "import os, sys; from git_credential_codestore import config;"
        "from git_credential_codestore.source import TokenRequest, get_token;"
        f"t = get_token(TokenRequest({REPO!r}, ('git:read',), True, purpose='test'), config.load());"
        "assert t.reveal().startswith('eyJ');"
        "print(sorted(m for m in ('jwt', 'cryptography', 'keyring', 'click') if m in sys.modules))"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CODESTORE_ORG": "acme", "CODESTORE_AGENT_URL": world.agent.url,
           "MODAL_IDENTITY_TOKEN": world.issuer.sign(world.issuer.modal_claims())}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {sys.path!r}; " + code],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_minted_token_never_outlives_the_identity_token_that_bought_it(world: World, org_key: OrgKey) -> None:
    # Threat: an identity about to expire buying a Code Storage token that lives on.
    import time

    from git_credential_codestore.agent import wire
    from git_credential_codestore.agent.client import Endpoint, exchange
    from git_credential_codestore.secrets import Secret
    from git_credential_codestore.vocab import TokenRequest
    from tests.test_agent import verify

    world.trust(*MODAL_POLICY)
    claims = world.issuer.modal_claims(lifetime=200, issued=int(time.time()) - 100)  # 100 s left
    body = wire.encode_request(TokenRequest(REPO, ("git:read",), True, 900, purpose="test"))
    status, reply = exchange(Endpoint.from_url(world.agent.url), "POST", "/v1/token", body, wire.CONTENT_TYPE,
                             identity=Secret(world.issuer.sign(claims)))
    fields = wire.decode(reply)
    assert status == 200, fields
    minted = verify(fields["token"], org_key)
    identity_exp = claims["exp"]
    assert isinstance(identity_exp, int) and minted.exp <= identity_exp


def test_modals_48_hour_tokens_are_refused_unless_the_policy_allows_that_lifetime(world: World) -> None:
    # Threat: a long-lived identity token accepted by default.
    p = world.trust(*[a for a in MODAL_POLICY if a not in ("--max-identity-lifetime", "2d")])
    proc = ls_remote(f"{world.server.url}/{REPO}+ephemeral.git", world.sandbox(MODAL_IDENTITY_TOKEN=world.issuer.sign(world.issuer.modal_claims())))
    assert proc.returncode != 0
    assert f"trust policy {p['id']}: the identity token lives 172800s, longer than the policy's --max-identity-lifetime of 3600s" in proc.stderr
