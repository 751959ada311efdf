"""Trust policies in the agent's database: durable, audited, shared by replicas.

Agents are the installed `codestore agent serve` in real subprocesses; the issuer is the
real loopback OIDC issuer of tests/oidc_issuer.py (HTTPS, test CA); the fleet store is a
real PostgreSQL (tests/realparts.py), the embedded one SQLite in the state dir.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from git_credential_codestore.agent.client import AgentRefused
from tests.conftest import OrgKey
from tests.oidc_issuer import CertAuthority, Issuer
from tests.realparts import Postgres
from tests.test_agent import REPO, Agent, mint, sandbox_env
from tests.test_agent_store import admin, first_refusal, replica


def policy_body(issuer: Issuer) -> dict[str, object]:
    return {"issuer": issuer.url, "audience": "oidc.modal.com", "claims": [["workspace_id", "ac-12345abcd"]],
            "repos": [REPO], "scopes": "git:read", "ephemeral_only": True, "max_identity_lifetime": 172800,
            "sub_template": "modal:{workspace_id}/{container_id}"}


def exchange(a: Agent, issuer: Issuer) -> str:
    """A workload with only the agent's URL and a Modal-shaped identity asks for a token."""
    return mint(sandbox_env(url=a.url, MODAL_IDENTITY_TOKEN=issuer.sign(issuer.modal_claims())), ephemeral=True)


def audit_events(a: Agent, *events: str) -> list[dict[str, object]]:
    return [e for e in a.audit() if e["event"] in events]


def test_a_policy_removed_on_one_replica_is_refused_by_another_within_a_second(
        tmp_path: Path, org_key: OrgKey, pg_url: str, ca: CertAuthority, issuer: Issuer) -> None:
    # Threat: a withdrawn trust policy that keeps admitting workloads on the replicas that did not remove it.
    a = replica(tmp_path, "a", pg_url, env=ca.agent_env())
    b = replica(tmp_path, "b", pg_url, env=ca.agent_env())
    try:
        status, p = admin(a, "POST", "/v1/trust", policy_body(issuer))
        assert status == 201, p
        assert exchange(b, issuer)  # added on A, honoured on B at once
        status, listed = admin(b, "GET", "/v1/trust")
        assert status == 200 and [q["id"] for q in listed["policies"]] == [p["id"]]
        status, _ = admin(a, "POST", f"/v1/trust/{p['id']}/remove")
        removed_at = time.monotonic()
        assert status == 200
        refusal = first_refusal(lambda: exchange(b, issuer), removed_at, 1.0, "replica B still exchanges a second after the removal")
        assert "no trust policy trusts identity tokens from" in str(refusal)
        # The same audit trail as grants: the change on A in its database rows and file, the exchanges on B.
        assert [e["id"] for e in audit_events(a, "trust-add", "trust-remove")] == [p["id"], p["id"]]
        exchanges = [e for e in audit_events(b, "mint", "refuse") if e.get("issuer")]
        assert exchanges[0]["result"] == "ok" and exchanges[0]["policy"] == p["id"]
        assert exchanges[0]["claims"] == {"workspace_id": "ac-12345abcd"}
        assert "no trust policy trusts identity tokens from" in str(audit_events(b, "refuse")[-1]["reason"])
    finally:
        a.stop()
        b.stop()


def test_policies_survive_a_restart_in_sqlite_with_their_audit_rows_in_the_same_database(
        tmp_path: Path, org_key: OrgKey, ca: CertAuthority, issuer: Issuer) -> None:
    # Threat: an owner told "added"/"removed" for a change a restart then forgets.
    a = replica(tmp_path, "a", env=ca.agent_env())
    status, p = admin(a, "POST", "/v1/trust", policy_body(issuer))
    assert status == 201, p
    status, gone = admin(a, "POST", "/v1/trust", {**policy_body(issuer), "claims": [["app_name", "x"]]})
    assert status == 201
    assert admin(a, "POST", f"/v1/trust/{gone['id']}/remove")[0] == 200
    a.stop()
    db = tmp_path / "a" / "agent-state" / "agent.sqlite3"
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM trust_policies")] == [p["id"]]
        events = [r[0] for r in conn.execute("SELECT event FROM audit WHERE event LIKE 'trust-%' ORDER BY id")]
    assert events == ["trust-add", "trust-add", "trust-remove"]
    assert not (tmp_path / "a" / "agent-state" / "trust.json").exists()
    a = replica(tmp_path, "a", env=ca.agent_env())
    try:
        assert [q["id"] for q in admin(a, "GET", "/v1/trust")[1]["policies"]] == [p["id"]]
        assert exchange(a, issuer)
        status, reply = admin(a, "POST", f"/v1/trust/{gone['id']}/remove")
        assert status == 404 and "codestore trust list" in str(reply["error"])
    finally:
        a.stop()


def test_a_trust_file_from_an_earlier_version_is_imported_on_first_start_losing_nothing(
        tmp_path: Path, org_key: OrgKey, ca: CertAuthority, issuer: Issuer) -> None:
    # Threat: an upgrade that drops the owner's policies (workloads locked out) or resurrects removed ones.
    state = tmp_path / "a" / "agent-state"
    state.mkdir(parents=True, mode=0o700)
    old = {"id": "0123456789ab", "issuer": issuer.url, "audience": "oidc.modal.com",
           "claims": [["workspace_id", "ac-*"]], "repos": [REPO], "scopes": ["git:read"], "max_ttl": 600,
           "ephemeral_only": True, "refs": [], "sub_template": "modal:{container_id}",
           "max_identity_lifetime": 172800, "created_at": 1700000000}
    (state / "trust.json").write_text(json.dumps({"version": 1, "policies": [old]}))
    a = replica(tmp_path, "a", env=ca.agent_env())
    try:
        status, listed = admin(a, "GET", "/v1/trust")
        assert status == 200 and listed["policies"] == [old]
        assert exchange(a, issuer)
    finally:
        a.stop()
    assert not (state / "trust.json").exists() and (state / "trust.json.migrated").exists()


def test_an_unreadable_trust_file_stops_the_agent_in_one_line(tmp_path: Path, org_key: OrgKey, ca: CertAuthority) -> None:
    # Threat: serving with a policy set the agent could not read (a removal it never saw).
    state = tmp_path / "a" / "agent-state"
    state.mkdir(parents=True, mode=0o700)
    (state / "trust.json").write_text("{not json")
    with pytest.raises(AssertionError, match="cannot migrate the trust policies") as e:
        replica(tmp_path, "a", env=ca.agent_env())
    assert "Traceback" not in str(e.value)


def test_with_the_database_gone_exchanges_and_policy_changes_are_refused_in_one_line(
        tmp_path: Path, org_key: OrgKey, ca: CertAuthority, issuer: Issuer) -> None:
    # Threat: admitting a workload under a policy that may have been removed while the store was away.
    pg = Postgres()  # a server of its own: this test stops it
    pg.start()
    try:
        a = replica(tmp_path, "a", pg.url(), env=ca.agent_env())
        try:
            status, p = admin(a, "POST", "/v1/trust", policy_body(issuer))
            assert status == 201, p
            assert exchange(a, issuer)
            pg.stop()
            with pytest.raises(AgentRefused) as refused:
                exchange(a, issuer)
            assert "cannot read the trust policies" in str(refused.value) and "\n" not in str(refused.value)
            status, reply = admin(a, "POST", f"/v1/trust/{p['id']}/remove")
            assert status == 503 and "was NOT removed" in str(reply["error"])
            status, reply = admin(a, "POST", "/v1/trust", policy_body(issuer))
            assert status == 503 and "no trust policy was added" in str(reply["error"])
            pg.start()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert exchange(a, issuer)
                    break
                except AgentRefused:
                    assert time.monotonic() < deadline, "exchanges did not come back with the database"
                    time.sleep(0.1)
            assert [q["id"] for q in admin(a, "GET", "/v1/trust")[1]["policies"]] == [p["id"]]
        finally:
            a.stop()
    finally:
        pg.destroy()
