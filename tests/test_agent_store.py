"""The agent's state in a database: migration, durability, faults, replicas.

Agents are the installed `codestore agent serve` in real subprocesses; the fleet store is
a real PostgreSQL (tests/realparts.py), the embedded one SQLite in the state dir.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from git_credential_codestore import audit
from git_credential_codestore.agent import audit as agent_audit
from git_credential_codestore.agent import db, wire
from git_credential_codestore.agent.client import AgentRefused, Endpoint, call, exchange
from git_credential_codestore.agent.db import ANSWER_DEADLINE, Database, StoreError, Tx
from git_credential_codestore.agent.grants import FLUSH_INTERVAL, Grant, GrantStore
from tests.conftest import BIN, OrgKey, run_cli, wait_for
from tests.realparts import Postgres, process_tree, raw_exchange
from tests.test_agent import REPO, Agent, mint, sandbox_env, start_agent


def admin(a: Agent, method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, Any]]:
    return call(Endpoint("unix", a.socket), method, path, body)


def create(a: Agent, **fields: object) -> dict[str, object]:
    status, reply = admin(a, "POST", "/v1/grants", {"repos": [REPO], **fields})
    assert status == 201, reply
    return reply


def used_once(store: GrantStore, n: int) -> list[Grant]:
    """n new grants, each with one use counted and not yet flushed (three flush transactions' worth: 3 * FLUSH_CHUNK)."""
    made = [store.create(repos=[REPO], scopes=["git:read"], max_ttl=300)[0] for _ in range(n)]
    for grant in made:
        store.record_use(grant, ok=True)
    return made


def replica(tmp_path: Path, name: str, store: str | None = None, env: dict[str, str] | None = None,
            extra: tuple[str, ...] = ()) -> Agent:
    """An agent of its own under tmp_path/name (its own socket); on `store` when given, else its SQLite; `extra` arguments."""
    return start_agent(tmp_path / name, *(("--store", store) if store else ()), "--socket", str(tmp_path / name / "s" / "agent.sock"),
                       *extra, env=env)


def first_refusal(attempt: Callable[[], object], since: float, within: float, late: str) -> AgentRefused:
    """Repeat `attempt` until the agent refuses it; `late` fails the test once `within` seconds have passed since `since`."""
    while True:
        try:
            attempt()
        except AgentRefused as e:
            return e
        assert time.monotonic() - since < within, late
        time.sleep(0.02)


def serve_fails(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--state-dir", str(tmp_path / "agent-state"), *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


# -- the embedded store --------------------------------------------------------------------


def test_an_existing_grants_json_is_migrated_on_first_start_losing_nothing(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: an upgrade forgetting a revocation (the revoked grant would mint again).
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    live, dead = "csg_aaaaaaaaaaaa_" + "L" * 43, "csg_bbbbbbbbbbbb_" + "D" * 43
    old = {"version": 1, "grants": [
        {"id": gid, "secret_sha256": hashlib.sha256(s.encode()).hexdigest(), "repos": [REPO], "scopes": ["git:read"],
         "max_ttl": 900, "sub": f"old-{gid}", "created_at": 1700000000, "expires_at": None, "ephemeral_only": False,
         "refs": [], "own_socket": False, "revoked_at": revoked, "uses": 7, "refusals": 0, "last_use": None}
        for gid, s, revoked in (("aaaaaaaaaaaa", live, None), ("bbbbbbbbbbbb", dead, 1700000100))
    ]}
    (state / "grants.json").write_text(json.dumps(old))
    a = start_agent(tmp_path)
    try:
        assert mint(sandbox_env(live, sock=a.socket))
        with pytest.raises(AgentRefused, match="revoked"):
            mint(sandbox_env(dead, sock=a.socket))
        listed = {g["id"]: g for g in json.loads(a.cli("grant", "list", "--json").stdout)}
        assert listed["aaaaaaaaaaaa"]["uses"] == 8 and listed["bbbbbbbbbbbb"]["state"] == "revoked"
    finally:
        a.stop()
    assert not (state / "grants.json").exists() and (state / "grants.json.migrated").exists()


_ONE = {"id": "aaaaaaaaaaaa", "secret_sha256": "0" * 64, "repos": [REPO], "scopes": ["git:read"], "max_ttl": 900,
        "sub": "s", "created_at": 1700000000}


@pytest.mark.parametrize("text", [
    '{"grants": "x"}', '{"grants": [null]}', json.dumps({"grants": [{**_ONE, "refs": [["main"]]}]}),
    # Entries the old store never wrote, each of which failed later and everywhere:
    json.dumps({"grants": [{**_ONE, "id": "../x/y", "own_socket": True}]}),  # a socket path: every replica's start failed
    json.dumps({"grants": [{**_ONE, "id": "ABCDEF123456"}]}),  # minted, and no revoke could address it
    json.dumps({"grants": [{**_ONE, "expires_at": "2030-01-01"}]}),  # `grant list` failed for every grant
    json.dumps({"grants": [{**_ONE, "max_ttl": 10**30}]}),  # OverflowError
    json.dumps({"grants": [{**_ONE, "sub": "\ud800"}]}),  # UnicodeEncodeError
    json.dumps({"grants": [{**_ONE, "uses": 1.5}]}),
    '{"grants": ' + "[" * 100000 + "]" * 100000 + "}",  # RecursionError
], ids=["not-a-list", "null-grant", "ref-rule-without-ops", "id-a-path", "id-not-hex", "expires-at-text", "max-ttl-huge",
        "sub-lone-surrogate", "uses-not-a-count", "nested-deep"])
def test_a_damaged_grants_json_is_one_line_at_start_not_an_internal_error(tmp_path: Path, org_key: OrgKey, text: str) -> None:
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    (state / "grants.json").write_text(text)
    proc = serve_fails(tmp_path, "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot migrate the old grant store" in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert (state / "grants.json").read_text() == text  # left for the admin to fix


def test_an_id_twice_in_grants_json_is_one_grant_revoked_if_either_entry_is(tmp_path: Path, org_key: OrgKey) -> None:
    # The old store read its file into a dict: the later entry won. Migration kept the first,
    # so [active, revoked] of one id came back active, and minted.
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    secret = "csg_aaaaaaaaaaaa_" + "L" * 43
    one = {**_ONE, "secret_sha256": hashlib.sha256(secret.encode()).hexdigest()}
    (state / "grants.json").write_text(json.dumps({"grants": [one, {**one, "revoked_at": 1700000100}, one]}))
    a = start_agent(tmp_path)
    try:
        with pytest.raises(AgentRefused, match="revoked"):
            mint(sandbox_env(secret, sock=a.socket))
        assert [g["state"] for g in json.loads(a.cli("grant", "list", "--json").stdout)] == ["revoked"]
    finally:
        a.stop()


@pytest.mark.parametrize("name", ["grants.json", "trust.json"])
def test_an_old_store_that_is_a_pipe_is_one_line_at_start_not_a_hang(tmp_path: Path, org_key: OrgKey, name: str) -> None:
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / name)
    proc = serve_fails(tmp_path, "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{state / name} is not a regular file; move it away" in proc.stderr, proc.stderr


def _malformed(path: Path) -> None:
    """An SQLite database whose schema page is overwritten: the header is fine, the rest is not."""
    db = sqlite3.connect(path)
    for i in range(20):
        db.execute(f"CREATE TABLE t{i} (x)")
    db.commit()
    db.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * 3996
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a database at all\n" * 100), "not an SQLite database"),
        (lambda p: sqlite3.connect(p).execute("CREATE TABLE payroll (x)").connection.commit(), "not codestore's"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000), "is damaged (file is not a database); restore it"),
        (_malformed, "is damaged (database disk image is malformed); restore it from a backup, or move it away"),
    ],
    ids=["garbage", "foreign", "damaged-header", "damaged-schema"],
)
def test_a_corrupt_or_foreign_store_is_refused_at_start_in_one_line(tmp_path: Path, org_key: OrgKey, prepare, message: str) -> None:
    # Threat: an agent writing grants into someone else's database, or serving from a damaged one.
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    prepare(state / "agent.sqlite3")
    before = (state / "agent.sqlite3").read_bytes()
    proc = serve_fails(tmp_path, "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("codestore: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (state / "agent.sqlite3").read_bytes() == before  # never written to


def test_one_damaged_grant_row_is_that_grants_refusal_not_every_grants(tmp_path: Path, org_key: OrgKey) -> None:
    # One row the poll could not read (a column edited by hand) failed every poll: every grant
    # went stale and was refused as "the grant store is not answering", and /readyz said so.
    a = start_agent(tmp_path)
    try:
        good, bad = create(a), create(a)
        for g in (good, bad):
            mint(sandbox_env(g["grant"], sock=a.socket))  # both cached
        db = sqlite3.connect(tmp_path / "agent-state" / "agent.sqlite3", timeout=30)
        db.execute("UPDATE grant_changes SET seq = seq + 1")
        db.execute("UPDATE grants SET repos = 'not json', seq = (SELECT seq FROM grant_changes) WHERE id = ?", (bad["id"],))
        db.commit()
        db.close()
        time.sleep(1.5)  # past STALE_AFTER, as a failed poll would have made it
        assert mint(sandbox_env(good["grant"], sock=a.socket))
        with pytest.raises(AgentRefused, match=f"row of grant '{bad['id']}' is damaged"):
            mint(sandbox_env(bad["grant"], sock=a.socket))
        assert admin(a, "GET", "/readyz")[0] == 200
        assert admin(a, "POST", f"/v1/grants/{bad['id']}/revoke")[0] == 200  # what the refusal says to do
    finally:
        a.stop()


def test_a_store_file_moved_away_under_the_agent_takes_no_more_grants_and_says_so(tmp_path: Path, org_key: OrgKey) -> None:
    # The agent's connections kept writing to the moved file: creates were acknowledged into
    # it, /readyz stayed 200, and the next start made a new empty store, the grants gone.
    a = start_agent(tmp_path)
    try:
        g = create(a)
        state = tmp_path / "agent-state"
        os.rename(state / "agent.sqlite3", state / "moved.sqlite3")
        assert wait_for(lambda: admin(a, "GET", "/readyz")[0] == 503, timeout=5)
        status, ready = admin(a, "GET", "/readyz")
        assert "was moved or replaced while the agent ran; restart the agent" in str(ready["store"]), ready
        status, reply = admin(a, "POST", "/v1/grants", {"repos": [REPO]})
        assert status == 503 and "no grant was created" in str(reply["error"]) and "moved" in str(reply["error"]), reply
        assert mint(sandbox_env(g["grant"], sock=a.socket))  # what it holds it still serves
    finally:
        a.stop()


def test_a_store_that_is_not_a_file_is_refused_at_start_in_one_line(tmp_path: Path, org_key: OrgKey) -> None:
    # /dev/null read as an empty file (a new store), then failed as "disk I/O error", naming no fix.
    proc = serve_fails(tmp_path, "--store", "/dev/null", "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is not a regular file" in proc.stderr, proc.stderr


def test_an_empty_store_file_is_a_new_store(tmp_path: Path, org_key: OrgKey) -> None:
    # What a crash between creating the file and SQLite's first write leaves: the agent must
    # start again on it (SQLite reads an empty file as an empty database; it holds no grant).
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o700)
    (state / "agent.sqlite3").touch(mode=0o600)
    a = start_agent(tmp_path)
    try:
        g = create(a)
        assert mint(sandbox_env(g["grant"], sock=a.socket))
    finally:
        a.stop()
    assert (state / "agent.sqlite3").read_bytes().startswith(b"SQLite format 3\x00")


@pytest.mark.parametrize(("change", "message"), [
    ("UPDATE codestore_schema SET version = 99 WHERE component = 'grants'", "newer codestore (grants schema v99"),
    # A part of the schema this codestore does not know was accepted, though docs/fleet.md says a newer one is refused.
    ("INSERT INTO codestore_schema (component, version) VALUES ('quotas', 1)", "newer codestore (its schema has quotas"),
    # Damage that was an internal error (ValueError, IndexError) at start:
    ("UPDATE codestore_schema SET version = 'abc' WHERE component = 'grants'", "is damaged (a schema version that is no version)"),
    ("DELETE FROM grant_changes", "is damaged (its change counter is gone)"),
], ids=["newer-version", "unknown-component", "version-not-a-number", "change-counter-gone"])
def test_a_store_from_a_newer_codestore_or_damaged_is_refused_at_start(tmp_path: Path, org_key: OrgKey, change: str, message: str) -> None:
    a = start_agent(tmp_path)
    a.stop()
    db = sqlite3.connect(tmp_path / "agent-state" / "agent.sqlite3")
    db.execute(change)
    db.commit()
    db.close()
    proc = serve_fails(tmp_path, "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "internal error" not in proc.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a small tmpfs needs root")
def test_on_a_full_filesystem_nothing_acknowledged_is_lost_and_nothing_refused_is_kept(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat (issue 8 item 4): a revocation reported as done, then undone by a restart.
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        a = start_agent(mnt)
        acknowledged: dict[str, str] = {}  # grant id -> "active" | "revoked" as the admin was told
        refused: list[str] = []
        try:
            for _ in range(5):
                g = create(a)
                acknowledged[str(g["id"])] = "active"
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # fill the filesystem to the last block
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            for gid in list(acknowledged):
                status, reply = admin(a, "POST", f"/v1/grants/{gid}/revoke")
                if status == 200:
                    acknowledged[gid] = "revoked"
                else:
                    assert status == 503 and "NOT revoked" in str(reply["error"]), reply
                    refused.append(gid)
            for _ in range(5):
                status, reply = admin(a, "POST", "/v1/grants", {"repos": [REPO]})
                if status == 201:
                    acknowledged[str(reply["id"])] = "active"
                else:
                    assert status == 503 and "no grant was created" in str(reply["error"]), reply
            listed = {g["id"]: g["state"] for g in admin(a, "GET", "/v1/grants")[1]["grants"]}
            assert {gid: listed[gid] for gid in acknowledged} == acknowledged  # memory says what the disk says
            # Issue 8 item 9: stopping on a full disk is a clean exit, not an internal error.
            a.proc.terminate()
            assert a.proc.wait(timeout=20) == 0
            assert a.proc.stderr is not None
            err = a.proc.stderr.read()
            assert "Traceback" not in err and "internal error" not in err, err
            filler.unlink()
        finally:
            a.stop()
        b = start_agent(mnt)
        try:
            listed = {g["id"]: g["state"] for g in admin(b, "GET", "/v1/grants")[1]["grants"]}
        finally:
            b.stop()
        assert {gid: listed.get(gid) for gid in acknowledged} == acknowledged
        assert set(listed) == set(acknowledged)  # no refused create came back
        assert refused, "the filesystem never filled up: the test proved nothing"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- the fleet store: replicas on one PostgreSQL ---------------------------------------------


def test_a_grant_created_on_one_replica_mints_on_another_at_once(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    try:
        g = create(a)
        assert mint(sandbox_env(g["grant"], sock=b.socket))
    finally:
        a.stop()
        b.stop()


def test_a_revocation_on_one_replica_is_refused_by_another_within_a_second(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # Threat: a revoked grant that keeps working on the replicas that did not revoke it.
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    try:
        g = create(a)
        env = sandbox_env(g["grant"], sock=b.socket)
        mint(env)  # B has it cached now
        status, _ = admin(a, "POST", f"/v1/grants/{g['id']}/revoke")
        revoked_at = time.monotonic()
        assert status == 200
        refusal = first_refusal(lambda: mint(env), revoked_at, 1.0, "replica B still mints a second after the revocation")
        assert "revoked" in str(refusal)
    finally:
        a.stop()
        b.stop()


def test_with_the_database_gone_a_replica_refuses_to_mint_in_one_line_and_recovers(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: minting under a grant that may have been revoked while the store was away.
    pg = Postgres()  # a server of its own: this test stops it
    pg.start()
    try:
        a = replica(tmp_path, "a", pg.url())
        try:
            g = create(a)
            env = sandbox_env(g["grant"], sock=a.socket)
            mint(env)
            pg.stop()
            time.sleep(1.3)  # past STALE_AFTER
            with pytest.raises(AgentRefused) as refused:
                mint(env)
            assert "unreachable" in str(refused.value) or "not answering" in str(refused.value)
            assert "\n" not in str(refused.value)
            # A sandbox is told that, not the database's address or the driver's words.
            where = pg.url().split("@", 1)[1].split("/")[0]  # host:port
            assert where not in str(refused.value) and "connection" not in str(refused.value), refused.value
            with pytest.raises(AgentRefused) as refused:
                mint(sandbox_env(g["grant"], url=a.url))
            assert where not in str(refused.value), refused.value
            status, reply = admin(a, "POST", "/v1/grants", {"repos": [REPO]})
            assert status == 503 and "no grant was created" in str(reply["error"])
            assert where in str(reply["error"])  # the owner's: where, and why
            status, ready = admin(a, "GET", "/readyz")  # what a load balancer asks
            assert status == 503 and ready["ready"] is False and "unreachable" in str(ready["store"]), ready
            status, ready = call(Endpoint("http", "127.0.0.1", int(a.url.rsplit(":", 1)[1])), "GET", "/readyz")
            assert status == 503 and ready["store"] == "the grant store is not answering", ready  # anyone's: whether, not where
            # And the owner: `agent status` said "0 active, 0 revoked" and exit 0, a store with no grant.
            shown = a.cli("agent", "status", "--socket", a.socket)
            assert shown.returncode == 1 and "grants     unknown: " in shown.stdout and " 0 active" not in shown.stdout, shown
            assert shown.stderr.count("\n") == 1 and "cannot read its grant store" in shown.stderr, shown.stderr
            pg.start()
            deadline = time.monotonic() + 10
            while True:
                try:
                    mint(env)
                    break
                except AgentRefused:
                    assert time.monotonic() < deadline, "the replica did not recover when the database came back"
                    time.sleep(0.1)
            # Ready again once its next flush has written too (the store takes writes again).
            assert wait_for(lambda: admin(a, "GET", "/readyz")[0] == 200, timeout=FLUSH_INTERVAL * 3 + 2)
        finally:
            a.stop()
    finally:
        pg.destroy()


def _pause(pg: Postgres, sig: signal.Signals) -> None:
    """Stop (or continue) every process of the server: it keeps its connections open and answers nothing."""
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    for pid in process_tree(postmaster):
        os.kill(pid, sig)


@pytest.fixture(scope="module")
def pausable() -> Iterator[Postgres]:
    """A server of this module's own for the tests that stop it (every one resumes it)."""
    with Postgres() as pg:
        yield pg


def test_with_the_database_hung_readyz_answers_at_once_and_says_why(tmp_path: Path, org_key: OrgKey, pausable: Postgres) -> None:
    # A database that stops answering without closing its connections (a paused VM, a
    # storage stall): /readyz ran a query of its own on a pooled connection and hung with
    # it, holding the load balancer's probe (and a handler thread) for as long as the
    # database stayed away, instead of saying why.
    pg = pausable
    a = replica(tmp_path, "a", pg.create_database())
    ep = Endpoint("unix", a.socket)
    try:
        create(a)
        _pause(pg, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            while True:
                status, ready = call(ep, "GET", "/readyz", timeout=3)
                if status == 503:
                    break
                assert time.monotonic() - t0 < 2.0, "/readyz still says ready 2 s after the database stopped answering"
                time.sleep(0.1)
            assert ready["ready"] is False, ready
            assert "not answering" in str(ready["store"]) or "unreachable" in str(ready["store"]), ready
        finally:
            _pause(pg, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while call(ep, "GET", "/readyz", timeout=3)[0] != 200:
            assert time.monotonic() < deadline, "/readyz did not recover when the database answered again"
            time.sleep(0.1)
    finally:
        a.stop()


def test_a_statement_the_hung_database_does_not_answer_fails_in_one_line_and_its_connection_is_dropped(pausable: Postgres) -> None:
    # Threat (the masking): the database password in a log line or a refusal.
    url = pausable.create_database().replace("postgres@", "postgres:hunter2@", 1)  # trust auth: any password does
    store = Database(url).open()
    try:
        with store.transaction(write=False) as tx:
            tx.execute("SELECT 1")  # a pooled connection to hang on
        failed: dict[str, tuple[float, str]] = {}
        maybe: dict[str, bool] = {}

        def attempt(name: str, work: Callable[[Tx], object]) -> None:
            t0 = time.monotonic()
            try:
                with store.transaction() as tx:
                    work(tx)
            except StoreError as e:
                failed[name] = (time.monotonic() - t0, str(e))
                maybe[name] = e.maybe_committed  # what a caller reports: "not done", or "may be done"

        stopped = threading.Event()

        def write_then_commit_hung(tx: Tx) -> None:  # COMMIT is the statement the stopped server holds
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('probe', 'x')")
            stopped.wait(10)

        writer = threading.Thread(target=attempt, args=("commit", write_then_commit_hung))
        writer.start()
        time.sleep(0.5)  # the writer's INSERT is answered
        _pause(pausable, signal.SIGSTOP)
        try:
            stopped.set()
            attempt("read", lambda tx: tx.execute("SELECT 1"))  # on a new connection: the connect timeout, or the deadline
            writer.join(ANSWER_DEADLINE + 5)
        finally:
            _pause(pausable, signal.SIGCONT)
        took, message = failed["commit"]
        assert ANSWER_DEADLINE <= took < ANSWER_DEADLINE + 1.5, took
        where = url.rpartition("@")[2]  # the store named as in every store error, its userinfo masked
        assert message.startswith("the grant store postgresql://") and message.endswith(
            f"@{where} did not answer within {ANSWER_DEADLINE:g} s; the change may still be committed when it answers"), message
        assert "hunter2" not in message and "hunter2" not in failed["read"][1]
        assert maybe == {"commit": True, "read": False}
        assert failed["read"][0] < ANSWER_DEADLINE + 1.5 and "\n" not in failed["read"][1], failed["read"]
        # The connections given up on were closed, not pooled (the pool hands out its newest
        # first): the store answers the next transactions as before. And the message was
        # right to hedge: the resumed server read the COMMIT waiting in its socket and ran it.
        def probe() -> bool:
            with store.transaction(write=False) as tx:
                return bool(tx.execute("SELECT value FROM codestore_meta WHERE key = 'probe'"))

        assert wait_for(probe, timeout=5), "the commit sent before the server stopped was not run when it resumed"
    finally:
        store.close()


def test_with_the_database_hung_metrics_and_admin_calls_answer_within_the_deadline(tmp_path: Path, org_key: OrgKey, pausable: Postgres) -> None:
    # A stopped server keeps its connections open: the kernel still acknowledges TCP, so no
    # keepalive, statement timeout or cancel request ended the query. `/metrics` (its grant
    # counts) and `grant create` each held a handler thread for as long as it stayed away.
    pg = pausable
    a = replica(tmp_path, "a", pg.create_database())
    ep = Endpoint("unix", a.socket)
    try:
        create(a)
        within = ANSWER_DEADLINE + 2.5  # a watchdog tick, and a reconnect's slack
        answers: dict[str, tuple[float, int, str]] = {}

        def ask(name: str, method: str, path: str, body: bytes) -> None:
            t0 = time.monotonic()
            status, reply = exchange(ep, method, path, body, "application/json" if body else None, timeout=within + 5)
            answers[name] = (time.monotonic() - t0, status, reply.decode())

        _pause(pg, signal.SIGSTOP)
        try:
            # A token's audit row for the flush thread, whose next flush then waits on the hung
            # server. `grant list` and audit queries flush first: they waited for that flush to
            # give up (what is left of a deadline), then tried again on a new connection (its
            # 3 s connect timeout). Now they wait for that flush alone and fail with it.
            assert exchange(ep, "POST", "/v1/token", f"repo={REPO}\nscopes=git:read\n".encode(), wire.CONTENT_TYPE)[0] in {200, 503}
            time.sleep(FLUSH_INTERVAL + 0.3)
            askers = [threading.Thread(target=ask, args=("metrics", "GET", "/metrics", b"")),
                      threading.Thread(target=ask, args=("create", "POST", "/v1/grants", json.dumps({"repos": [REPO]}).encode())),
                      threading.Thread(target=ask, args=("list", "GET", "/v1/grants", b"")),
                      threading.Thread(target=ask, args=("audit", "POST", "/v1/audit/query", b"{}"))]
            for t in askers:
                t.start()
            for t in askers:
                t.join(within + 10)
            assert set(answers) == {"metrics", "create", "list", "audit"}, f"no answer within {within + 5:.0f} s with the database hung: {answers}"
            for name in ("list", "audit"):
                took, status, text = answers[name]
                assert took < ANSWER_DEADLINE + 1 and status == 503 and "\n" not in json.loads(text)["error"], (name, answers[name])
            took, status, text = answers["create"]
            assert took < within and status == 503, answers["create"]
            error = json.loads(text)["error"]
            assert "no grant was created" in error and "\n" not in error, error
            assert f"did not answer within {ANSWER_DEADLINE:g} s" in error or "unreachable" in error, error
            took, status, text = answers["metrics"]
            assert took < within and status == 200 and "codestore_agent_store_up 0\n" in text, answers["metrics"]
            assert "codestore_agent_grants{" not in text  # no counts it could not read
            # Once the grant poll knows the store is away, a scrape does not ask it at all.
            t0 = time.monotonic()
            status, body = exchange(ep, "GET", "/metrics", b"", None)
            assert status == 200 and "codestore_agent_store_up 0\n" in body.decode() and time.monotonic() - t0 < 1
            assert a.proc.poll() is None
        finally:
            _pause(pg, signal.SIGCONT)
        # The connections given up on were discarded, not pooled: the same calls work again.
        deadline = time.monotonic() + 10
        while (status := admin(a, "POST", "/v1/grants", {"repos": [REPO]})[0]) != 201:
            assert time.monotonic() < deadline, f"grant create did not recover when the database answered again ({status})"
            time.sleep(0.1)
        def counted() -> bool:  # once the grant poll has heard from the store again
            status, body = exchange(ep, "GET", "/metrics", b"", None)
            return status == 200 and 'codestore_agent_grants{state="active"} 2\n' in body.decode()

        assert wait_for(counted, timeout=5)
    finally:
        a.stop()


def test_a_replica_killed_mid_create_loses_no_acknowledged_grant(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # Threat: an admin told "created" (or "revoked") for a change that a crash then lost.
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    acknowledged: list[dict[str, object]] = []
    stop = threading.Event()

    def creator() -> None:
        while not stop.is_set():
            try:
                status, reply = admin(a, "POST", "/v1/grants", {"repos": [REPO]})
            except Exception:  # noqa: BLE001 - the replica dies under us: that is the test
                return
            if status == 201:
                acknowledged.append(reply)

    threads = [threading.Thread(target=creator) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        a.proc.kill()  # SIGKILL, mid-create
        for t in threads:
            t.join(20)
        assert len(acknowledged) > 5
        for g in acknowledged:
            assert mint(sandbox_env(g["grant"], sock=b.socket))
    finally:
        stop.set()
        a.stop()
        b.stop()


def test_a_store_that_takes_no_writes_is_unready_and_refused_at_start(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # Threat: a replica on a store that reads but takes no writes (a read-only standby, a
    # read-only file) said ready and minted, while a compromised grant could not be revoked
    # through it: a load balancer kept sending sandboxes there.
    import psycopg

    a = replica(tmp_path, "a", pg_url)
    ep = Endpoint("unix", a.socket)
    try:
        g = create(a)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {pg_url.rsplit('/', 1)[1]} SET default_transaction_read_only = on")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")

        def unready() -> bool:
            with contextlib.suppress(AgentRefused):
                mint(sandbox_env(g["grant"], sock=a.socket))  # reads still work: its audit row is a write for the flush
            status, body = exchange(ep, "GET", "/readyz", b"", None)
            return status == 503 and "took no write" in json.loads(body)["store"]

        assert wait_for(unready, timeout=10)
        status, reply = admin(a, "POST", f"/v1/grants/{g['id']}/revoke")
        assert status == 503 and "NOT revoked" in reply["error"], reply
    finally:
        a.stop()
    proc = serve_fails(tmp_path, "--store", pg_url, "--socket", str(tmp_path / "b" / "agent.sock"))
    assert proc.returncode == 1 and "takes no writes" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_foreign_postgresql_database_is_refused_at_start(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    proc = serve_fails(tmp_path, "--store", pg_url, "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and "not codestore's" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_store_urls_own_options_are_kept(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # `?options=-csearch_path=codestore` (the agent's tables in a schema of their own) was
    # replaced by the agent's statement timeout: its tables went into `public`, beside
    # whatever else lives there, and the foreign-tables check looked at the wrong schema.
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA codestore")
    a = replica(tmp_path, "a", pg_url + "?options=-csearch_path%3Dcodestore")
    try:
        create(a)
    finally:
        a.stop()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        schemas = {r[0] for r in conn.execute("SELECT table_schema FROM information_schema.tables WHERE table_name = 'grants'")}
    assert schemas == {"codestore"}


def test_an_unreachable_postgresql_at_start_is_one_line(tmp_path: Path, org_key: OrgKey, refused_port: int) -> None:
    proc = serve_fails(tmp_path, "--store", f"postgresql://u:secretpw@127.0.0.1:{refused_port}/x", "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "unreachable" in proc.stderr, proc.stderr
    assert "secretpw" not in proc.stderr  # Threat: the database password in a log line
    # An '@' left unescaped in the password: the mask stopped at the first '@', and the
    # driver's "failed to resolve host 'Leak9Part@127.0.0.1'" quoted the rest of it.
    proc = serve_fails(tmp_path, "--store", f"postgresql://u:Xy@Leak9Part@127.0.0.1:{refused_port}/x", "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "as %40" in proc.stderr, proc.stderr
    assert "Leak9Part" not in proc.stderr and "Xy" not in proc.stderr
    from git_credential_codestore.agent.db import describe

    assert describe("postgresql://u:Xy@Leak9Part@h:1/x?a=b") == "postgresql://u:***@h:1/x?a=b"


def _pipe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# How a pipe comes to be a file libpq opens: (URL suffix, environment, files to write). A
# pipe there held `agent serve` for ever (libpq opens the file before it looks at it; no
# timeout covers it): each case but the last fails by timing out without the check. The
# SSL files are opened only once a server takes SSL (this one does not), so sslrootcert=
# shows the check runs before any connection; its hang itself is not measured here.
_PIPES: dict[str, tuple[str, dict[str, str], dict[str, str | None]]] = {
    "passfile=": ("?passfile={pipe}", {}, {}),
    "PGPASSFILE": ("", {"PGPASSFILE": "{pipe}"}, {}),
    "~/.pgpass": ("", {}, {"home/.pgpass": None}),
    "the service file": ("?service=fleet", {"PGSERVICEFILE": "{pipe}"}, {}),
    "PGSYSCONFDIR's service file": ("?service=fleet", {"PGSYSCONFDIR": "{tmp}/etc"}, {"etc/pg_service.conf": None}),
    "a service's passfile": ("?service=fleet", {}, {"home/.pg_service.conf": "[fleet]\npassfile={pipe}\n"}),
    "sslrootcert=": ("?sslmode=require&sslrootcert={pipe}", {}, {}),
}


@pytest.mark.parametrize("how", list(_PIPES))
def test_a_pipe_where_libpq_reads_a_file_is_one_line_at_start_not_a_hang(tmp_path: Path, org_key: OrgKey, pg_url: str,
                                                                       how: str) -> None:
    suffix, env, files = _PIPES[how]
    pipe = str(_pipe(tmp_path / "secrets" / "pipe"))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    for name, text in files.items():
        if text is None:
            _pipe(tmp_path / name)
            pipe = str(tmp_path / name)
        else:
            (tmp_path / name).write_text(text.format(pipe=pipe))
    proc = subprocess.run(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--state-dir", str(tmp_path / "agent-state"),
         "--socket", str(tmp_path / "s" / "agent.sock"), "--store", pg_url + suffix.format(pipe=pipe)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home), **{k: v.format(pipe=pipe, tmp=tmp_path) for k, v in env.items()}},
    )
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{pipe}, which is a pipe, and wait on it for ever; name a regular file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_regular_libpq_files_are_let_through(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # The check refuses only what would hang: a service file naming a regular passfile works.
    home = tmp_path / "home"
    (home / ".postgresql").mkdir(parents=True)
    (home / "pgpass").write_text("# nothing for this server\n")
    (home / "pgpass").chmod(0o600)
    (home / ".pg_service.conf").write_text(f"[fleet]\npassfile={home / 'pgpass'}\n")
    problem = db._file_problem(pg_url + "?service=fleet", {"HOME": str(home)})
    assert problem is None
    # The service's passfile wins over PGPASSFILE, as in libpq; without the service, PGPASSFILE is read.
    assert db._file_problem(pg_url + "?service=fleet", {"HOME": str(home), "PGPASSFILE": str(_pipe(tmp_path / "p"))}) is None
    assert "which is a pipe" in str(db._file_problem(pg_url, {"HOME": str(home), "PGPASSFILE": str(tmp_path / "p")}))
    # A device or a directory libpq opens at once and ignores (measured): not refused.
    for other in (os.devnull, "/dev/zero", str(home)):
        assert db._file_problem(pg_url, {"HOME": str(home), "PGPASSFILE": other}) is None
    # A password in the URL: libpq never opens a passfile, so a pipe there does not matter.
    assert db._file_problem(pg_url.replace("postgres@", "postgres:pw@"), {"HOME": str(home), "PGPASSFILE": str(tmp_path / "p")}) is None


def test_a_pipe_that_appears_after_the_start_fails_a_new_connection_instead_of_hanging(pg_url: str, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = db.Database(pg_url)
    try:
        store._connect().close()  # type: ignore[attr-defined]
        _pipe(tmp_path / ".pgpass")
        t0 = time.monotonic()
        with pytest.raises(Exception, match="which is a pipe, and wait on it for ever") as e:
            store._connect()
        assert time.monotonic() - t0 < 2
        assert isinstance(e.value, store._errors())  # a store error like any other: requests are refused, /readyz says why
    finally:
        store.close()


def test_a_grant_this_replica_has_not_seen_is_read_once_then_served_from_its_cache(tmp_path: Path, org_key: OrgKey) -> None:
    # codestore_agent_grant_reads_total: how often a replica asks the store for a grant its
    # cache does not hold (sizing the cache, or seeing a replica warm up after a start).
    a = start_agent(tmp_path)
    g = create(a)
    a.stop()
    a = start_agent(tmp_path)  # the same store, an empty cache
    try:
        env = sandbox_env(g["grant"], url=a.url)
        for _ in range(3):
            mint(env)
        from git_credential_codestore.agent.client import exchange

        status, text = exchange(Endpoint("http", "127.0.0.1", int(a.url.rsplit(":", 1)[1])), "GET", "/metrics", b"", None)
        assert status == 200 and "codestore_agent_grant_reads_total 1\n" in text.decode()
    finally:
        a.stop()


@pytest.mark.parametrize("store_answers", [True, False])
def test_requests_arriving_together_for_a_grant_not_cached_read_it_once(tmp_path: Path, store_answers: bool) -> None:
    # Requests for a grant this replica has not cached arrive together (a sandbox's first
    # fetch): each read it from the store, and behind a hung store each waited its own
    # deadline. Now one reads, the others wait for that read and share what it found.
    first = GrantStore(str(tmp_path / "state")).open()
    grant, _ = first.create(repos=[REPO], scopes=["git:read"], max_ttl=900)
    first.close()
    store = GrantStore(str(tmp_path / "state")).open()  # an empty cache
    slow = 0.3
    transaction = store.db.transaction

    @contextlib.contextmanager
    def a_slow_store(*, write: bool = True, durable: bool = True) -> Iterator[Tx]:  # a store that takes its time (or hangs, then fails)
        time.sleep(slow)
        if not store_answers:
            raise StoreError("the grant store did not answer within 0.3 s")
        with transaction(write=write, durable=durable) as tx:
            yield tx

    store.sync()  # fresh for a second (the poll's part), with no grant read
    store.db.transaction = a_slow_store  # type: ignore[method-assign]
    try:
        results: list[object] = []
        start = threading.Barrier(8)

        def ask() -> None:
            start.wait()
            try:
                results.append(store.get(grant.id))
            except StoreError as e:
                results.append(e)

        t0 = time.monotonic()
        askers = [threading.Thread(target=ask) for _ in range(8)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(10)
        took = time.monotonic() - t0
    finally:
        store.db.transaction = transaction  # type: ignore[method-assign]
        store.close()
    assert store.reads == 1  # before: 8
    assert took < 3 * slow  # before, with the store failing: one deadline after another
    if store_answers:
        assert all(isinstance(r, type(grant)) and r.id == grant.id for r in results) and len(results) == 8, results
    else:
        assert len(results) == 8 and all(isinstance(r, StoreError) for r in results), results
        assert store.errors == 1  # one store call failed; the others did not ask


def test_grant_list_pages_and_filters(tmp_path: Path, org_key: OrgKey) -> None:
    a = start_agent(tmp_path)
    try:
        made = [create(a, sub=f"s{i % 2}", repos=[f"team/r{i % 3}"]) for i in range(7)]
        admin(a, "POST", f"/v1/grants/{made[0]['id']}/revoke")
        made.sort(key=lambda g: (g["created_at"], g["id"]))  # the listing's order: creation time, then id
        seen, cursor = [], None
        while True:
            status, reply = admin(a, "GET", "/v1/grants?limit=3" + (f"&after={cursor}" if cursor else ""))
            assert status == 200 and len(reply["grants"]) <= 3
            seen += [g["id"] for g in reply["grants"]]
            cursor = reply["next_cursor"]
            if not cursor:
                break
        assert seen == [g["id"] for g in made]
        only = admin(a, "GET", "/v1/grants?sub=s1&repo=team/r1")[1]["grants"]
        assert [g["id"] for g in only] == [g["id"] for g in made if g["sub"] == "s1" and g["repos"] == ["team/r1"]]
        revoked = [g for g in admin(a, "GET", "/v1/grants?state=revoked")[1]["grants"]]
        assert len(revoked) == 1 and revoked[0]["state"] == "revoked"
        active = [g for g in made if g["id"] != revoked[0]["id"]]
        out = run_cli("codestore", "grant", "list", "--json", "--state", "active", "--limit", "2", env=a.env)
        assert out.returncode == 0, out.stderr
        assert [g["id"] for g in json.loads(out.stdout)] == [g["id"] for g in active[:2]]
        assert "--after " in out.stderr  # where the next page starts
        # The printed command is this listing's next page (it dropped the filters and --json:
        # run as printed, it listed other subs' and repositories' grants).
        pages, command = [g["id"] for g in json.loads(out.stdout)], out.stderr.split("more: codestore ", 1)[1].split()
        while True:
            out = run_cli("codestore", *command, env=a.env)
            assert out.returncode == 0, out.stderr
            pages += [g["id"] for g in json.loads(out.stdout)]
            if "more: " not in out.stderr:
                break
            command = out.stderr.split("more: codestore ", 1)[1].split()
        assert pages == [g["id"] for g in active]
        out = run_cli("codestore", "grant", "list", "--sub", "s0", "--repo", "team/r0", "--limit", "1", env=a.env)
        assert "--repo team/r0 --sub s0 --limit 1 --after " in out.stderr, out.stderr
    finally:
        a.stop()


def test_a_per_minute_limit_holds_across_replicas(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # Threat: a leaked grant used at full speed by spreading requests over replicas.
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    try:
        g = create(a, max_per_minute=3)
        while time.time() % 60 > 50:  # the count is per calendar minute: do not straddle one
            time.sleep(0.5)
        mint(sandbox_env(g["grant"], sock=a.socket))
        mint(sandbox_env(g["grant"], sock=a.socket))
        mint(sandbox_env(g["grant"], sock=b.socket))
        with pytest.raises(AgentRefused, match="3 tokens a minute"):
            mint(sandbox_env(g["grant"], sock=b.socket))
    finally:
        a.stop()
        b.stop()


def test_when_only_the_audit_file_fails_the_admin_is_told_what_is_true(tmp_path: Path, org_key: OrgKey) -> None:
    # Issue 8 item 4: a 500 for a change that was in fact made sends the admin the wrong way.
    a = start_agent(tmp_path, "--audit-log", "/dev/full")  # every write: ENOSPC
    try:
        status, g = admin(a, "POST", "/v1/grants", {"repos": [REPO]})
        assert status == 201 and g["grant"] and "was created, but the audit log file" in str(g["warning"]), g
        status, r = admin(a, "POST", f"/v1/grants/{g['id']}/revoke")
        assert status == 200 and r["state"] == "revoked" and "is revoked, but" in str(r["warning"]), r
        cli = a.cli("grant", "create", "--repo", REPO)
        assert cli.returncode == 0 and "codestore: warning: grant" in cli.stderr
        live = json.loads(a.cli("grant", "list", "--json", "--state", "active").stdout)[0]
        # Every token handed out is in the audit log, or it is not handed out.
        with pytest.raises(AgentRefused, match="cannot write the audit log"):
            mint(sandbox_env(str(cli.stdout.split("grant:")[1].split()[0]), sock=a.socket))
        # And a token not handed out is not recorded as minted (its row was buffered before
        # the file refused its line, and reached the table as a mint).
        status, found = admin(a, "POST", "/v1/audit/query", {"event": "mint"})
        assert status == 200 and found["entries"] == [], found
        # A refusal stands whatever the file says: refused as ever (not a 500), its row kept.
        with pytest.raises(AgentRefused, match="unknown grant"):
            mint(sandbox_env("csg_000000000000_" + "A" * 43, sock=a.socket))
        asked = raw_exchange(a.socket, b"GET /v1/grants HTTP/1.1\r\nHost: a\r\nAuthorization: Grant x\r\nConnection: close\r\n\r\n")
        assert asked.startswith(b"HTTP/1.1 403"), asked[:200]
        status, found = admin(a, "POST", "/v1/audit/query", {"event": "refuse"})
        reasons = [str(e["reason"]) for e in found["entries"]]
        assert any("unknown grant" in r for r in reasons) and "admin call from a non-owner" in reasons, reasons
        assert any(r.startswith("cannot write the audit log /dev/full") for r in reasons), reasons  # the mint refused above
    finally:
        a.stop()
    b = start_agent(tmp_path)
    try:
        listed = {x["id"]: x["state"] for x in admin(b, "GET", "/v1/grants")[1]["grants"]}
        assert listed == {g["id"]: "revoked", live["id"]: "active"}
    finally:
        b.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_use_counts_of_many_grants_are_flushed_exactly(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    # The flush writes a hundred grants a statement, then powers of two (230 = 100+100+16+8+4+2):
    # counts on both sides of each statement's edge, and a grant's last use, must come out
    # exactly; other grants' rows untouched.
    from git_credential_codestore.agent.grants import GrantStore

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = GrantStore(str(tmp_path / "state"), url).open()
    try:
        made = [store.create(repos=[REPO], scopes=["git:read"], max_ttl=300)[0] for _ in range(250)]
        for i, grant in enumerate(made[:230]):
            for _ in range(i % 3 + 1):
                store.record_use(grant, ok=True)
            if i % 7 == 0:
                store.record_use(grant, ok=False)
        store.flush()
        store.record_use(made[0], ok=True)
        store.flush()
        got = {g.id: g for g in store.page(limit=1000)[0]}
        for i, grant in enumerate(made):
            g = got[grant.id]
            expected = (i % 3 + 1 if i < 230 else 0) + (i == 0)
            assert (g.uses, g.refusals) == (expected, int(i < 230 and i % 7 == 0)), i
            assert (g.last_use is not None) == (i < 230)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_flushed_audit_rows_come_back_exactly(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    # The flush writes rows as one table (PostgreSQL: by COPY, binary), and execute_rows does
    # for the use counts (PostgreSQL: an array a column, sent binary): texts JSON and people
    # write, columns with no value at all, both edges of a statement.
    from git_credential_codestore.agent.audit import _TABLE, _TYPES
    from git_credential_codestore.agent.grants import GrantStore

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = GrantStore(str(tmp_path / "state"), url).open()
    texts = ['{"a":"b \\\\ \\"q\\""}', "naïve ünïcode ✓", "line\nbreak", "", "{x}", "%s %b ? '", "tab\tand \\N"]
    n = max(2 * db.PG_ROWS_PER_STATEMENT, 2 * db.PG_COPY_ROWS) + 131
    rows = [(1_700_000_000 + i, "mint", None, texts[i % len(texts)], None, "ok", "host:1", texts[(i + 1) % len(texts)])
            for i in range(n)]
    try:
        with store.db.transaction() as tx:
            tx.insert_rows(_TABLE, _TYPES, rows[:n // 2])
            tx.execute_rows(f"INSERT INTO {_TABLE} SELECT * FROM {{rows}}", _TYPES, rows[n // 2:])
            tx.insert_rows(_TABLE, _TYPES, [])
            tx.execute_rows(f"INSERT INTO {_TABLE} SELECT * FROM {{rows}}", _TYPES, [])
        with store.db.transaction(write=False) as tx:
            got = tx.execute("SELECT time, event, grant_id, sub, repo, result, replica, fields FROM audit ORDER BY time")
        assert got == rows
    finally:
        store.close()


def test_on_postgresql_a_seconds_audit_rows_go_in_statements_that_each_hold_the_gil_briefly(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # psycopg turns a statement's arrays into its wire format in one call that holds the GIL
    # throughout: a second's 14k audit rows in one statement held it 30 ms, and the event
    # loop answered nothing for 39 ms (the longest stall on PostgreSQL, 36-62 ms a run).
    from git_credential_codestore.agent.audit import _TABLE, _TYPES
    from git_credential_codestore.agent.grants import GrantStore

    store = GrantStore(str(tmp_path / "state"), pg_url).open()
    n = 5 * db.PG_ROWS_PER_STATEMENT + 7
    rows = [(1_700_000_000 + i, "mint", f"g{i % 1000}", f"s{i}", "team/app", "ok", "host:1", "{}") for i in range(n)]
    sizes: list[int] = []
    real = Tx.execute

    def execute(self: Tx, sql: str, params: Any = ()) -> list[tuple[object, ...]]:
        if sql.startswith("INSERT INTO audit"):
            sizes.append(len(params[0]))
        return real(self, sql, params)

    monkeypatch.setattr(Tx, "execute", execute)
    try:
        with store.db.transaction() as tx:  # still one transaction
            tx.execute_rows(f"INSERT INTO {_TABLE} SELECT * FROM {{rows}}", _TYPES, rows)
        assert sizes == [db.PG_ROWS_PER_STATEMENT] * 5 + [7]
        with store.db.transaction(write=False) as tx:
            assert tx.execute("SELECT count(*) FROM audit")[0][0] == n
    finally:
        store.close()


def test_on_postgresql_a_grant_changes_audit_row_and_its_span_are_one_statement(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A grant change waits for its audit row: numbering it, a COPY and the span's COPY were
    # four round trips to a fleet's server where one INSERT had been one.
    store = GrantStore(str(tmp_path / "state"), pg_url).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    statements: list[str] = []
    real_execute, real_copy = db._Watched.execute, db._Watched.copy_rows

    def execute(self: db._Watched, sql: str, params: Any = None) -> object:
        statements.append(sql)
        return real_execute(self, sql, params)

    def copy_rows(self: db._Watched, statement: str, types: Any, rows: Any) -> None:
        statements.append(statement)
        real_copy(self, statement, types, rows)

    try:
        for fields in ({"grant": "g1", "sub": "s1", "ttl": 1}, {"ttl": 2}):  # the second has nothing to span
            write, after = log.in_transaction("grant-create", fields)
            with store.db.transaction() as tx:
                monkeypatch.setattr(db._Watched, "execute", execute)
                monkeypatch.setattr(db._Watched, "copy_rows", copy_rows)
                write(tx)
                monkeypatch.undo()
            assert len(statements) == 1, statements
            statements.clear()
            assert after() is None
        with store.db.transaction(write=False) as tx:
            assert tx.execute("SELECT grant_id, sub, last_id - first_id, bucket = first_id >> 16 FROM audit_spans") == [("g1", "s1", 0, True)]
            assert tx.execute("SELECT count(*) FROM audit WHERE spanned = 1") == [(2,)]
            assert tx.execute("SELECT kind, value, area = (SELECT first_id >> 22 FROM audit_spans) FROM audit_span_areas ORDER BY kind") == [
                ("grant", "g1", True), ("sub", "s1", True)]
        assert [e["ttl"] for e in agent_audit.search(store.db, audit.Query(grant="g1"), 10)[0]] == [1]
    finally:
        store.close()
        log.close()


def test_on_sqlite_no_statement_of_the_audit_insert_has_more_than_999_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite before 3.32 (Ubuntu 20.04's 3.31) refuses a statement of more than 999
    # parameters; an audit row is 10 of them, and 100 rows a statement would be 1000.
    store = GrantStore(str(tmp_path / "state"), None).open()
    sizes: list[int] = []
    real = db.Tx.execute

    def execute(self: db.Tx, sql: str, params: Any = ()) -> list[tuple[object, ...]]:
        sizes.append(len(params))
        return real(self, sql, params)

    monkeypatch.setattr(db.Tx, "execute", execute)
    try:
        rows = [(int(time.time()), "mint", f"g{n % 3}", "s", "team/app", "ok", "r:1", "{}") for n in range(300)]
        with store.db.transaction() as tx:
            agent_audit.insert(tx, rows)
        assert 0 < max(sizes) <= db.SQLITE_PARAMETERS
        with store.db.transaction(write=False) as tx:
            assert tx.execute("SELECT count(*) FROM audit")[0][0] == 300
    finally:
        store.close()


def test_on_postgresql_audit_ids_another_session_numbered_between_end_a_span(tmp_path: Path, pg_url: str) -> None:
    # Another replica's flush takes numbers from the same sequence at the same time; the
    # numbers one statement gets are then not one run. Made certain here by a sequence that
    # steps by 2: each row is then a span of its own, and no span holds a number it did not get.
    store = GrantStore(str(tmp_path / "state"), pg_url).open()
    try:
        with store.db.transaction() as tx:
            tx.execute("ALTER SEQUENCE audit_id_seq INCREMENT BY 2")
        with store.db.transaction() as tx:
            ids = tx.new_ids("audit", 5)
            rows = [(int(time.time()), "mint", "g1", "s1", "team/app", "ok", "r:1", "{}")] * 5
            agent_audit.insert(tx, rows)
        assert ids == list(range(ids[0], ids[0] + 10, 2))
        with store.db.transaction(write=False) as tx:
            got = tx.execute("SELECT first_id, last_id FROM audit_spans ORDER BY first_id")
            numbered = [r[0] for r in tx.execute("SELECT id FROM audit ORDER BY id")]
        assert [(int(a), int(b)) for a, b in got] == [(i, i) for i in numbered] and len(numbered) == 5  # type: ignore[call-overload]
    finally:
        store.close()


def test_on_postgresql_a_query_by_grant_reads_its_spans_first_then_their_rows_by_id(tmp_path: Path, pg_url: str) -> None:
    # PostgreSQL's planner joined spans and rows the other way round: it walked the whole
    # audit table back by id, looking each row up in the spans (0.9 s a page of 300k rows).
    # The grant's spans come from its buckets on the spans' index, then their rows by id.
    store = GrantStore(str(tmp_path / "state"), pg_url).open()
    try:
        now = int(time.time())
        with store.db.transaction() as tx:
            rows = [(now, "mint", f"g{n % 200}", "s", "team/app", "ok", "r:1", json.dumps({"event": "mint", "grant": f"g{n % 200}"}))
                    for n in range(20000)]
            agent_audit.insert(tx, rows)  # a span a row: 20000 of them
            tx.execute("ANALYZE audit")
            tx.execute("ANALYZE audit_spans")
        query = audit.Query(grant="g7")
        with store.db.transaction(write=False) as tx:
            sql, params = agent_audit.spans_statement(query, None, 51, list(range(63, -1, -1)))
            plan = "\n".join(str(r[0]) for r in tx.execute("EXPLAIN " + sql, params))
            assert "audit_spans_at_grant" in plan and "Seq Scan" not in plan, plan
            spans, floor = agent_audit._bucketed_spans(tx, query, None, 51)
            assert len(spans) == 51 and floor == spans[-1][0], spans
            sql, params = agent_audit.rows_statement(query, None, spans, 51, "postgresql")
            plan = "\n".join(str(r[0]) for r in tx.execute("EXPLAIN " + sql, params))
        assert "Index Scan using audit_pkey on audit " in plan and "Seq Scan on audit " not in plan, plan
        assert plan.index("Function Scan on s ") < plan.index("audit_pkey"), plan  # spans outside, each one's rows by id inside
        entries, more = agent_audit.search(store.db, query, 1000)
        assert len(entries) == 100 and more is None
    finally:
        store.close()


def test_on_postgresql_a_flush_copies_its_audit_rows_in_statements_each_under_the_deadline(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # INSERT ... SELECT FROM unnest(arrays) cost the flush thread 41-50 ms of CPU a second's
    # 13k rows beside the event loop; COPY, 22-25, in COPYs that each hold the GIL briefly.
    # Each COPY has its deadline, as every statement does (the next test).
    store = GrantStore(str(tmp_path / "state"), pg_url).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    store.on_flush = log.flush_into
    sizes: list[int] = []
    real = db._Watched.copy_rows

    def copy_rows(self: db._Watched, statement: str, types: Any, rows: Any) -> None:
        if not statement.startswith("COPY audit_spans "):
            sizes.append(len(rows))
            assert statement.startswith("COPY audit (id, spanned, time, event, grant_id, sub, repo, result, replica, fields) FROM STDIN")
        real(self, statement, types, rows)

    monkeypatch.setattr(db._Watched, "copy_rows", copy_rows)
    monkeypatch.setattr(agent_audit, "ID_ROWS", 2 * db.PG_COPY_ROWS)  # numbered in two statements
    n = 2 * db.PG_COPY_ROWS + 5
    try:
        for i in range(n):
            log.record("mint", {"grant": f"g{i % 7}", "sub": f"s{i % 7}", "repo": "team/app", "result": "ok", "ttl": i})
        store.flush()
        assert sizes == [db.PG_COPY_ROWS, db.PG_COPY_ROWS, 5]
        assert log.buffered == 0
        with store.db.transaction(write=False) as tx:
            ttls = sorted(json.loads(str(r[0]))["ttl"] for r in tx.execute("SELECT fields FROM audit WHERE event = 'mint'"))
        assert ttls == list(range(n))  # each once
        with store.db.transaction(write=False) as tx:  # a span a grant, but where a COPY ends: its rows came grouped
            spans = tx.execute("SELECT grant_id, count(*), sum(last_id - first_id + 1) FROM audit_spans GROUP BY grant_id ORDER BY grant_id")
        assert [(g, int(k)) for g, _, k in spans] == [(f"g{i}", len(range(i, n, 7))) for i in range(7)]  # type: ignore[call-overload]
        assert sum(int(c) for _, c, _ in spans) <= 7 + 2  # type: ignore[call-overload]
        with store.db.transaction(write=False) as tx:
            assert [r[0] for r in tx.execute("SELECT count(*) FROM audit_spans s JOIN audit a ON a.id >= s.first_id "
                                             "AND a.id <= s.last_id WHERE a.grant_id <> s.grant_id")] == [0]
    finally:
        store.close()
        log.close()


def test_a_copy_the_hung_database_does_not_take_fails_within_the_deadline(pausable: Postgres) -> None:
    # A COPY is a stream of writes, then a wait for the server's answer: a stopped server
    # must not hold the flush thread (and the `grant list` waiting on its flush) forever.
    from git_credential_codestore.agent.audit import _TABLE, _TYPES

    store = Database(pausable.create_database()).open()
    big = "x" * 1000
    rows = [(1_700_000_000 + i, "mint", "g1", "s1", "team/app", "ok", "host:1", big) for i in range(3 * db.PG_COPY_ROWS)]
    try:
        statements: list[str] = []
        t0 = 0.0
        try:
            with pytest.raises(StoreError) as failed:
                with store.transaction() as tx:
                    tx.execute("SELECT 1")  # answered: the server stops in the middle of the transaction
                    _pause(pausable, signal.SIGSTOP)
                    try:
                        t0 = time.monotonic()
                        tx.insert_rows(_TABLE, _TYPES, rows)
                    finally:
                        statements.append(tx._cur.statement)  # type: ignore[attr-defined]
            took = time.monotonic() - t0
        finally:
            _pause(pausable, signal.SIGCONT)
        assert statements[0].startswith("COPY audit"), statements  # what it waited on
        assert took < ANSWER_DEADLINE + 1.5, took
        assert f"did not answer within {ANSWER_DEADLINE:g} s" in str(failed.value) and "\n" not in str(failed.value), str(failed.value)
        # The connection given up on was not pooled: the next transaction works, and nothing
        # of the failed one was committed.
        def count() -> int:
            with store.transaction(write=False) as tx:
                return int(tx.execute("SELECT count(*) FROM audit")[0][0])  # type: ignore[call-overload]

        assert wait_for(lambda: count() == 0, timeout=5)
    finally:
        store.close()


def test_a_view_any_number_of_changes_old_is_current_after_catch_up(tmp_path: Path, pg_url: str) -> None:
    # Threat: a worker started again, forked from a parent whose view is hours old, minting
    # under a grant revoked since, or refusing grants made since, until polls catch up
    # a thousand rows at a time.
    from git_credential_codestore.agent.grants import GrantStore

    old = GrantStore(str(tmp_path / "old"), pg_url).open()
    now = GrantStore(str(tmp_path / "now"), pg_url).open()
    try:
        first = now.create(repos=[REPO], scopes=["git:read"], max_ttl=300)[0]
        assert old.get(first.id) is not None
        made = [now.create(repos=[REPO], scopes=["git:read"], max_ttl=300)[0] for _ in range(1100)]
        now.revoke(first.id)
        old.catch_up()
        old.check()
        assert all(old.cached(g.id) is not None for g in made)
        revoked = old.cached(first.id)
        assert revoked is not None and revoked.revoked_at is not None
    finally:
        old.close()
        now.close()


@pytest.mark.parametrize(
    "query",
    ["after=%C2%B2.abc", "after=99999999999999999999.abc", "limit=%C2%B2"],
    ids=["superscript-time", "time-beyond-the-column", "superscript-limit"],
)
def test_a_malformed_page_cursor_or_limit_is_a_400_not_an_internal_error(agent: Agent, query: str) -> None:
    # "²".isdigit() is true and int("²") raises; a 20-digit time does not fit SQLite's integer.
    status, reply = admin(agent, "GET", f"/v1/grants?{query}")
    assert status == 400 and ("cursor" in reply["error"] or "limit" in reply["error"]), reply
    proc = run_cli("codestore", "grant", "list", "--after", "²." + "a" * 12, env=agent.env)
    assert proc.returncode == 1 and "bad page cursor" in proc.stderr and "internal error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_grant_list_filter_no_grant_can_hold_is_a_400_on_either_store(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest, org_key: OrgKey) -> None:
    # On PostgreSQL a NUL in the filter was a 503 "the grant store ... failed (PostgreSQL text
    # fields cannot contain NUL (0x00) bytes)": bad input read as the store being away.
    a = replica(tmp_path, "a", request.getfixturevalue("pg_url") if backend == "postgresql" else None)
    try:
        for query in ("sub=a%00b", "repo=team%2F%00app", "sub=a%1B%5B2Jb", "repo=team/%0Aapp"):
            status, reply = admin(a, "GET", f"/v1/grants?{query}")
            key = query.partition("=")[0]
            assert status == 400 and reply["error"].startswith(f"{key} takes text without control characters"), (query, status, reply)
        assert admin(a, "GET", "/v1/grants?sub=na%C3%AFve")[0] == 200  # other text is a filter, matching or not
        proc = run_cli("codestore", "grant", "list", "--sub", "a\x01b", env=dict(a.env, CODESTORE_AGENT_SOCK=a.socket))
        assert proc.returncode == 1 and "sub takes text without control characters" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "internal error" not in proc.stderr, proc.stderr
    finally:
        a.stop()


def test_the_store_password_is_shown_nowhere(tmp_path: Path, org_key: OrgKey, pg_url: str) -> None:
    # Threat: the database password, given as libpq's `password=` in the URL's query, printed
    # in the ready line and `agent status`, and sent to the owner in audit replies (and to
    # sandboxes in every refusal while the store is away: the same text).
    url = pg_url + "?password=hunter2pw&sslmode=disable"
    a = replica(tmp_path, "a", url)
    try:
        assert "store=postgresql://" in a.lines[-1] and "hunter2pw" not in "".join(a.lines)
        status = a.cli("agent", "status", "--json", "--socket", a.socket)
        assert status.returncode == 0 and "hunter2pw" not in status.stdout
        assert "hunter2pw" not in json.dumps(admin(a, "POST", "/v1/audit/query", {})[1])
    finally:
        a.stop()
    # A malformed URL: the driver's error quotes the part it could not read.
    port = url.split("@127.0.0.1:")[1].split("/")[0]
    proc = serve_fails(tmp_path, "--store", f"postgresql://u:hunter%ZZ2pw@127.0.0.1:{port}/x", "--socket", str(tmp_path / "s" / "agent.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "hunter" not in proc.stderr and "2pw" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_rate_limited_grant_keeps_no_count_of_past_minutes(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    # A grant with --max-per-minute in use all year must not leave a row per minute behind
    # in the shared database (half a million each), only the minute it is counting.
    from git_credential_codestore.agent.grants import GrantStore

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = GrantStore(str(tmp_path / "state"), url).open()
    try:
        grant, other = (store.create(repos=[REPO], scopes=["git:read"], max_ttl=300, max_per_minute=5)[0] for _ in range(2))
        while time.time() % 60 > 55:  # the count is per calendar minute: do not straddle one
            time.sleep(0.5)
        minute = int(time.time()) // 60
        with store.db.transaction() as tx:
            for gid, m, n in ((grant.id, minute - 90, 5), (grant.id, minute - 1, 2), (other.id, minute - 1, 1)):
                tx.execute("INSERT INTO grant_rate (grant_id, minute, count) VALUES (?, ?, ?)", (gid, m, n))
        assert store.take_rate(grant) == 1
        assert store.take_rate(grant) == 2
        with store.db.transaction(write=False) as tx:
            rows = {(str(g), int(m), int(n)) for g, m, n in tx.execute("SELECT grant_id, minute, count FROM grant_rate")}  # type: ignore[call-overload]
        assert rows == {(grant.id, minute, 2), (other.id, minute - 1, 1)}  # another grant's row waits for its own next minute
    finally:
        store.close()


def _fill_wal(store: Any, rounds: int) -> None:
    for n in range(rounds):  # 25 WAL pages a round
        with store.db.transaction() as tx:
            tx.execute_rows("INSERT INTO codestore_meta (key, value) SELECT v.column1, v.column2 FROM {rows}",
                            ("text", "text"), [(f"k{n}-{i}", "x" * 1000) for i in range(100)])


def test_no_commit_copies_the_wal_the_flush_thread_does(tmp_path: Path) -> None:
    # A commit that took SQLite's WAL past 1000 pages used to copy it into the database and
    # sync it: a `grant create` after a load took 126 ms. Commits now only append to the
    # WAL (the database file does not change); the flush thread copies it, once a second.
    from git_credential_codestore.agent.grants import GrantStore

    path = tmp_path / "state" / "agent.sqlite3"
    store = GrantStore(str(tmp_path / "state"), None).open()
    try:
        before = path.stat().st_size
        _fill_wal(store, 60)  # ~1500 WAL pages: well past SQLite's default threshold of 1000
        assert path.stat().st_size == before, "a commit checkpointed"
        assert (tmp_path / "state" / "agent.sqlite3-wal").stat().st_size > 1000 * 4096
        store.start()
        deadline = time.monotonic() + 5
        while path.stat().st_size < 60 * 100 * 1000:  # every row, in the database file
            assert time.monotonic() < deadline, "the flush thread did not checkpoint"
            time.sleep(0.05)
    finally:
        store.close()


@contextlib.contextmanager
def _grown_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idle: float) -> Iterator[tuple[GrantStore, Path, int]]:
    """(a store whose WAL holds 20 rounds of rows, the WAL, its size), cut back once over 1 MiB
    and quiet for `idle` seconds."""
    monkeypatch.setattr(db, "SHRINK_OVER", 1 << 20)
    monkeypatch.setattr(db, "SHRINK_IDLE", idle)
    wal = tmp_path / "state" / "agent.sqlite3-wal"
    store = GrantStore(str(tmp_path / "state"), None).open()
    try:
        _fill_wal(store, 20)
        yield store, wal, wal.stat().st_size
    finally:
        store.close()


def test_a_quiet_stores_wal_is_cut_back_by_the_flush_thread_losing_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite reuses its WAL from the start but never shrinks it: after a sustained load the
    # file kept hundreds of MiB for as long as the agent ran.
    with _grown_wal(tmp_path, monkeypatch, 2.5) as (store, wal, grown):
        assert grown > 2 << 20
        store.start()
        time.sleep(1.8)  # a flush step (every FLUSH_INTERVAL) has come and gone
        assert wal.stat().st_size == grown  # not while writes are recent
        deadline = time.monotonic() + 5
        while wal.stat().st_size:
            assert time.monotonic() < deadline, "the flush thread did not cut the WAL back"
            time.sleep(0.05)
        with store.db.transaction(write=False) as tx:
            assert tx.execute("SELECT count(*) FROM codestore_meta WHERE key LIKE 'k%'")[0][0] == 20 * 100


def test_cutting_the_wal_back_waits_for_no_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _grown_wal(tmp_path, monkeypatch, 0.0) as (store, wal, grown):
        reader = sqlite3.connect(str(tmp_path / "state" / "agent.sqlite3"), isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM codestore_meta").fetchone()  # a snapshot on the WAL
            started = time.monotonic()
            assert store.db.shrink_log() is False
            assert time.monotonic() - started < 1.0  # not BUSY_TIMEOUT
            assert wal.stat().st_size == grown
            reader.execute("COMMIT")
            assert store.db.shrink_log() is True
            assert wal.stat().st_size == 0
        finally:
            reader.close()
        with store.db.transaction() as tx:  # and the store writes on, through every pooled connection
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('after', 'cut')")


def test_a_writer_waits_for_another_processs_write_and_gives_up_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process (here: another connection) holding SQLite's write lock: a create waits
    # for it (polling in steps of at most 5 ms, not SQLite's sleeps of up to 100 ms), and
    # past the busy timeout refuses in one line rather than hanging.
    from git_credential_codestore.agent.grants import GrantStore

    store = GrantStore(str(tmp_path / "state"), None).open()
    other = sqlite3.connect(str(tmp_path / "state" / "agent.sqlite3"), isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
        grant, _ = store.create(repos=[REPO], scopes=["git:read"], max_ttl=60)  # waited, then wrote
        assert store.get(grant.id) is not None
        monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.2)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked") as refused:
            store.create(repos=[REPO], scopes=["git:read"], max_ttl=60)
        assert "\n" not in str(refused.value)
        other.execute("COMMIT")
        with store.db.transaction(write=False) as tx:
            assert tx.execute("PRAGMA busy_timeout")[0][0] == 200  # restored for what follows
    finally:
        other.close()
        store.close()


def test_a_flush_holds_back_while_another_processs_grant_change_waits_for_the_lock(tmp_path: Path) -> None:
    # Two SQLite workers draining their flushes after a load: a `grant create` on one had
    # to win SQLite's lock against the other's flush transactions, polling as they did
    # (p99 22-36 ms). A durable writer waiting now makes every process's flushes hold
    # back. Here two Database objects stand for the two workers, and a third connection
    # holds the lock; it is let go just after the flush starts to wait, when the flush's
    # polls are the quicker ones.
    from git_credential_codestore.agent.db import Database

    GrantStore(str(tmp_path / "state"), None).open().close()  # the schema
    path = str(tmp_path / "state" / "agent.sqlite3")
    worker_a, worker_b = Database(path), Database(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    events: list[str] = []

    def create() -> None:
        with worker_b.transaction() as tx:
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('b', 'created')")
            events.append("create")

    def flush() -> None:
        with worker_a.transaction(durable=False) as tx:
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('a', 'flushed')")
            events.append("flush")

    try:
        other.execute("BEGIN IMMEDIATE")
        threads = [threading.Thread(target=create)]
        threads[0].start()
        time.sleep(0.2)  # the create polls in its longest steps by now
        threads.append(threading.Thread(target=flush))
        threads[1].start()
        time.sleep(0.003)
        other.execute("COMMIT")
        for t in threads:
            t.join(10)
        assert events == ["create", "flush"]
    finally:
        other.close()
        worker_a.close()
        worker_b.close()


def test_a_grant_change_waiting_behind_its_own_processs_flush_already_holds_the_others_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With two SQLite workers, a `grant create` on A waited for A's flush transaction (A's
    # own lock), and only then said it was waiting: B's flushes went on meanwhile, and it
    # waited for one of B's next. Right after a load that was two waits in a row (p99 of
    # create/revoke over 20 ms in some bench runs). It now says so before it waits at all.
    from git_credential_codestore.agent.db import Database

    monkeypatch.setattr(db, "YIELD_MAX", 0.5)
    GrantStore(str(tmp_path / "state"), None).open().close()  # the schema
    path = str(tmp_path / "state" / "agent.sqlite3")
    worker_a, worker_b = Database(path), Database(path)
    flushing, release, created = threading.Event(), threading.Event(), threading.Event()

    def flush_a() -> None:
        with worker_a.transaction(durable=False) as tx:
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('a', 'flushed')")
            flushing.set()
            release.wait(10)

    def create_a() -> None:
        with worker_a.transaction() as tx:
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('c', 'created')")
        created.set()

    threads = [threading.Thread(target=flush_a), threading.Thread(target=create_a)]
    try:
        threads[0].start()
        assert flushing.wait(10)
        threads[1].start()
        time.sleep(0.1)  # the create waits for A's lock, held by A's flush
        assert not created.is_set()
        t0 = time.monotonic()
        worker_b._let_writers_first()  # B's next flush transaction
        held_back = time.monotonic() - t0
        assert held_back >= 0.4, f"B's flush went ahead of A's waiting create ({held_back:.3f} s)"
        release.set()
        assert created.wait(10)
        t0 = time.monotonic()
        worker_b._let_writers_first()  # nobody waits now
        assert time.monotonic() - t0 < 0.1
    finally:
        release.set()
        for t in threads:
            t.join(10)
        worker_a.close()
        worker_b.close()


def test_a_flush_holds_back_for_a_waiting_writer_only_so_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A grant change that waits for a long time (another process's writer holds the lock)
    # holds a flush back for YIELD_MAX at most: the flush waits for the lock as before.
    import fcntl


    monkeypatch.setattr(db, "YIELD_MAX", 0.3)
    GrantStore(str(tmp_path / "state"), None).open().close()
    path = str(tmp_path / "state" / "agent.sqlite3")
    database = db.Database(path)
    waiting = os.open(path + "-writers", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(waiting, fcntl.LOCK_SH)  # a writer waiting, for as long as this test likes
        t0 = time.monotonic()
        with database.transaction(durable=False) as tx:
            tx.execute("INSERT INTO codestore_meta (key, value) VALUES ('a', 'flushed')")
        assert 0.3 <= time.monotonic() - t0 < 3
    finally:
        os.close(waiting)
        database.close()


def test_a_create_gets_in_between_the_transactions_of_a_long_flush(tmp_path: Path) -> None:
    # On SQLite one writer at a time: a flush of many grants' use counts in one transaction
    # held a `grant create` for up to 300 ms under load. It is now a transaction a chunk,
    # and a create waiting for the first one is in before the flush's last.
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(str(tmp_path / "state"), None).open()
    try:
        used_once(store, 3 * g.FLUSH_CHUNK)
        events: list[str] = []

        def create() -> None:
            store.create(repos=[REPO], scopes=["git:read"], max_ttl=300)
            events.append("create")

        def on_flush(tx: object) -> Callable[[], bool]:
            events.append("flush")
            if events.count("flush") == 1:
                threading.Thread(target=create).start()
                time.sleep(0.2)  # the create is now waiting for this transaction's lock
            return lambda: False

        store.on_flush = on_flush
        store.flush()
        deadline = time.monotonic() + 5
        while "create" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events.count("flush") == 3
        assert events.index("create") < len(events) - 1, events  # not after the whole flush
        assert sum(x.uses for x in store.page(limit=1000)[0]) == 3 * g.FLUSH_CHUNK
    finally:
        store.close()


def test_a_slow_flush_step_is_followed_by_the_next_one_on_time_not_a_whole_interval_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The flush thread slept FLUSH_INTERVAL after each step, so a step that took most of a
    # second (a load's rows: 200 transactions of 100) came every two: under a sustained
    # closed loop (12-13k tokens/s, one process) the rows waiting for the database grew by
    # thousands a second, and past MAX_BUFFER the database lost them (the file kept them).
    # Steps now start every FLUSH_INTERVAL, whatever they take.
    from git_credential_codestore.agent import grants as g

    monkeypatch.setattr(g, "FLUSH_INTERVAL", 0.5)
    store = g.GrantStore(str(tmp_path / "state"), None).open()
    starts: list[float] = []

    def slow_flush(tx: Tx) -> Callable[[], bool]:
        starts.append(time.monotonic())
        time.sleep(0.35)  # most of an interval
        return lambda: False

    try:
        store.on_flush = slow_flush
        store.start()
        assert wait_for(lambda: len(starts) >= 4, timeout=5)
        seen = list(starts)  # the flush thread goes on appending
        gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        assert all(0.4 < gap < 0.7 for gap in gaps), gaps  # was 0.85 (0.35 + 0.5)
    finally:
        store.close()


def test_a_failed_flush_step_is_followed_by_a_whole_interval_and_a_waiting_flush_is_told_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Paced steps started again at once after one that failed on a hung store: the thread took
    # its lock back before an audit query waiting on it, which then waited for a second failure
    # (a new connection's timeout) as well: 8.6 s against a 6 s deadline, seen in CI.
    from git_credential_codestore.agent import grants as g

    monkeypatch.setattr(g, "FLUSH_INTERVAL", 0.5)
    store = g.GrantStore(str(tmp_path / "state"), None).open()
    steps: list[tuple[float, float]] = []
    waited: dict[str, str | float] = {}
    began = threading.Event()

    def failing_flush(tx: Tx) -> Callable[[], bool]:
        t0 = time.monotonic()
        began.set()
        time.sleep(1.5)  # longer than an interval: a paced loop would go again at once
        steps.append((t0, time.monotonic()))
        raise StoreError("the grant store did not answer")

    def wait_to_flush() -> None:
        t0 = time.monotonic()
        try:
            store.flush()
        except StoreError as e:
            waited["error"] = str(e)
        waited["took"] = time.monotonic() - t0

    try:
        store.on_flush = failing_flush
        store.start()
        assert began.wait(5)
        waiter = threading.Thread(target=wait_to_flush)  # inside the first step
        waiter.start()
        waiter.join(10)
        assert waited.get("error") == "the grant store did not answer", waited
        # The step it found running (at most 1.5 s), not a second one as well (about 3 s).
        assert float(waited["took"]) < 2.5, waited
        assert wait_for(lambda: len(steps) >= 3, timeout=10)
        seen = list(steps)
        rests = [b[0] - a[1] for a, b in zip(seen, seen[1:], strict=False)]
        assert all(rest > 0.45 for rest in rests), rests  # was 0.0: asked again at once
    finally:
        store.close()


def _audit_rows(tmp_path: Path, transactions: int) -> agent_audit.AuditLog:
    """An audit log holding `transactions` SQLite flush transactions' worth of mints."""
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    for n in range(transactions * agent_audit.FLUSH_ROWS):
        log.record("mint", {"grant": f"g{n % 7}", "ttl": n})
    return log


def test_the_flush_thread_spreads_a_steps_transactions_evenly_over_most_of_the_interval(tmp_path: Path) -> None:
    # Back to back, a second's 130 flush transactions (a closed loop's 13k audit rows) took the
    # first 350 ms of each second, and the flush thread's CPU and turns at the GIL slowed the
    # event loop by 40% meanwhile: the tokens in flight then were the closed loop's slowest
    # 1%. A step's transactions are now spread evenly over FLUSH_SPREAD of the interval.
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(str(tmp_path / "state"), None).open()
    log = _audit_rows(tmp_path, 50)
    starts: list[float] = []

    def on_flush(tx: Tx) -> Callable[[], int]:
        starts.append(time.monotonic())
        return log.flush_into(tx)

    try:
        store.on_flush = on_flush
        store.start()
        assert wait_for(lambda: log.buffered == 0, timeout=5)
        seen = starts[:50]  # the first step's (the thread goes on flushing nothing)
        gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        # Back to back: 50 transactions in 0.05-0.15 s here. Spread: about 0.75 s.
        assert 0.5 < seen[-1] - seen[0] < 1.5, seen[-1] - seen[0]
        # Evenly: most transactions paced apart (not a burst and then a wait), none long after the last.
        assert sorted(gaps)[len(gaps) // 2] > 0.01 and max(gaps) < 0.2, gaps
        assert len(agent_audit.search(store.db, audit.Query(event="mint"), 10_000)[0]) == 50 * agent_audit.FLUSH_ROWS
    finally:
        store.close()
        log.close()


def test_a_flush_waiting_for_a_spread_one_ends_the_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An audit query flushes this replica's rows first, and waits for a flush in progress: it
    # must not wait out the flush thread's spread (here up to 3 s) as well.
    from git_credential_codestore.agent import grants as g

    monkeypatch.setattr(g, "FLUSH_INTERVAL", 4.0)
    store = g.GrantStore(str(tmp_path / "state"), None).open()
    log = _audit_rows(tmp_path, 100)
    starts: list[float] = []
    waited: list[float] = []

    def wait_to_flush() -> None:
        t0 = time.monotonic()
        store.flush()
        waited.append(time.monotonic() - t0)

    def on_flush(tx: Tx) -> Callable[[], int]:
        starts.append(time.monotonic())
        if len(starts) == 5:
            threading.Thread(target=wait_to_flush).start()
        return log.flush_into(tx)

    try:
        store.on_flush = on_flush
        store.start()
        assert wait_for(lambda: bool(waited), timeout=15)
        # Spread, the 95 transactions left would take 2 s or more (FLUSH_PAUSE_MAX apart); back to
        # back, 0.1-0.3 s here.
        assert waited[0] < 1.2, waited
        assert log.buffered == 0
    finally:
        store.close()
        log.close()


def test_the_flush_thread_writes_audit_rows_every_second_and_use_counts_every_few(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Writing every used grant's count every second cost 10-15% of the throughput with 1000
    # grants in use: counts are written every COUNTS_EVERY, audit rows every FLUSH_INTERVAL;
    # a listing (page) writes the counts it shows first.
    from git_credential_codestore.agent import grants as g

    monkeypatch.setattr(g, "COUNTS_EVERY", 3.5)
    store = g.GrantStore(str(tmp_path / "state"), None).open()
    flushes: list[float] = []

    def on_flush(tx: Tx) -> Callable[[], bool]:
        flushes.append(time.monotonic())
        return lambda: False

    def stored_uses() -> int:
        with store.db.transaction(write=False) as tx:  # as it is (page() would write the counts first)
            return int(tx.execute("SELECT sum(uses) FROM grants")[0][0])  # type: ignore[call-overload]

    try:
        grant, _ = store.create(repos=[REPO], scopes=["git:read"], max_ttl=300)
        store.on_flush = on_flush
        store.start()
        assert wait_for(lambda: len(flushes) >= 1, timeout=3 * g.FLUSH_INTERVAL)  # the first step wrote counts (none)
        store.record_use(grant, ok=True)
        used = time.monotonic()
        assert wait_for(lambda: len(flushes) >= 3, timeout=4 * g.FLUSH_INTERVAL)
        assert stored_uses() == 0  # two audit flushes since, no counts
        assert wait_for(lambda: stored_uses() == 1, timeout=g.COUNTS_EVERY + 2 * g.FLUSH_INTERVAL)
        assert time.monotonic() - used > 2 * g.FLUSH_INTERVAL
        store.record_use(grant, ok=True)
        assert store.page(limit=10)[0][0].uses == 2  # a listing writes them at once
    finally:
        store.close()


def test_a_flush_commits_without_waiting_for_the_disk_and_syncs_outside_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A flush transaction that waited for the disk at its commit held SQLite's one write
    # lock 5-14 ms, and a `grant create` after a load waited behind each (p99 30-38 ms).
    # Its commits now only write; the WAL is synced after each, with the lock free, and
    # every other transaction (a grant change) still commits to disk.
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(str(tmp_path / "state"), None).open()
    try:
        used_once(store, 3 * g.FLUSH_CHUNK)
        modes: list[int] = []
        syncs: list[tuple[str, bool]] = []
        real = os.fdatasync

        def on_flush(tx: Any) -> Callable[[], bool]:
            modes.append(tx.execute("PRAGMA synchronous")[0][0])
            return lambda: False

        def fdatasync(fd: int) -> None:
            syncs.append((os.readlink(f"/proc/self/fd/{fd}"), store.db._lock.locked()))
            real(fd)

        store.on_flush = on_flush
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        store.flush()
        assert modes == [1, 1, 1]  # NORMAL: the commit does not wait for the disk
        wal = str(tmp_path / "state" / "agent.sqlite3-wal")
        assert syncs == [(wal, False)] * 3  # each transaction synced, with the write lock free
        assert sum(x.uses for x in store.page(limit=1000)[0]) == 3 * g.FLUSH_CHUNK
        for _ in range(3):  # whichever pooled connection a grant change gets commits durably
            with store.db.transaction() as tx:
                assert tx.execute("PRAGMA synchronous")[0][0] == 2  # FULL
    finally:
        store.close()


def test_a_flush_whose_sync_fails_says_so_and_counts_nothing_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sync after a flush transaction failing (the disk): a store error, once; what that
    # transaction committed is not written again by the next flush, and the rest is.
    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(str(tmp_path / "state"), None).open()
    try:
        used_once(store, 3 * g.FLUSH_CHUNK)

        def eio(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", eio)
        with pytest.raises(StoreError, match="cannot sync the grant store's log .*agent.sqlite3-wal .Input/output error.") as failed:
            store.flush()
        assert "\n" not in str(failed.value)
        with store.db.transaction(write=False) as tx:  # read as it is (page() would flush first)
            assert tx.execute("SELECT sum(uses) FROM grants")[0][0] == g.FLUSH_CHUNK  # the first transaction's
        monkeypatch.undo()
        store.flush()
        assert sorted(x.uses for x in store.page(limit=1000)[0]) == [1] * (3 * g.FLUSH_CHUNK)
    finally:
        store.close()


def test_a_flush_that_fails_for_a_reason_not_the_stores_keeps_its_counts_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A driver's encoding error (or a bug) in a flush dropped that second's use counts; only
    # a StoreError kept them for the next flush.
    store = GrantStore(str(tmp_path / "state")).open()
    try:
        grant, _ = store.create(repos=[REPO], scopes=["git:read"], max_ttl=900)
        first = [True]

        def rows(tx: Tx) -> Callable[[], bool]:
            if first.pop() if first else False:
                tx.execute("SELECT ?", ("\udc80",))  # a lone surrogate: sqlite3 raises UnicodeEncodeError
            return lambda: False

        store.on_flush = rows
        for _ in range(3):
            store.record_use(grant, True)
        store.start()

        def uses() -> int:
            with store.db.transaction(write=False) as tx:
                return int(tx.execute("SELECT uses FROM grants WHERE id = ?", (grant.id,))[0][0])  # type: ignore[call-overload]

        assert wait_for(lambda: uses() == 3, timeout=5), uses()
    finally:
        store.close()
    said = capsys.readouterr().err
    assert said == ("codestore agent: the use-count flush failed (UnicodeEncodeError('utf-8', '\\udc80', 0, 1, "
                    "'surrogates not allowed')); its counts are kept for the next one\n"), said


def test_a_failed_flush_is_one_store_error(tmp_path: Path) -> None:
    # codestore_agent_store_errors_total counted a failed flush twice: once in the flush,
    # once in the thread that ran it.
    from git_credential_codestore.agent import grants as g

    store = GrantStore(str(tmp_path / "state")).open()
    failed: list[float] = []

    def fail(tx: Tx) -> Callable[[], bool]:
        failed.append(time.monotonic())
        raise StoreError("the grant store is gone")

    try:
        store.on_flush = fail
        store.start()
        assert wait_for(lambda: len(failed) >= 2, timeout=3 * g.FLUSH_INTERVAL + 2)
    finally:
        store._stop.set()
        store.close()
    assert store.errors == len(failed)  # the flush thread's failures, and close()'s last flush


def test_on_postgresql_a_flush_commits_use_counts_before_it_writes_audit_rows(tmp_path: Path, pg_url: str) -> None:
    # Rows are locked, not the store: the counts are one transaction (short ones would buy
    # nothing but round trips). The audit rows, whose COPYs are spread over the flush interval
    # (_pace), come in the next: while they are written no grant's row is locked, so a
    # revocation on another replica does not wait for them.
    import psycopg

    from git_credential_codestore.agent import grants as g

    store = g.GrantStore(str(tmp_path / "state"), pg_url).open()
    try:
        made = used_once(store, 3 * g.FLUSH_CHUNK)
        calls: list[str] = []

        def on_flush(tx: object) -> Callable[[], bool]:
            with psycopg.connect(pg_url, autocommit=True) as other:
                try:
                    other.execute("SET lock_timeout = '2s'")
                    other.execute("UPDATE grants SET revoked_at = revoked_at WHERE id = %s", (made[0].id,))
                    calls.append("free")
                except psycopg.errors.LockNotAvailable:
                    calls.append("locked")
            return lambda: False

        store.on_flush = on_flush
        store.flush()
        assert calls == ["free"]  # once, in a transaction holding no grant's row
        assert sum(x.uses for x in store.page(limit=1000)[0]) == 3 * g.FLUSH_CHUNK
    finally:
        store.close()


def test_on_postgresql_the_flush_threads_copies_are_spread_and_a_waiting_flush_ends_the_spread(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sent back to back, a second's audit rows were 100-200 ms of the server's CPU at once
    # (and of the flush thread's), and the tokens in flight meanwhile were the closed loop's
    # slowest 1% with the server on the agent's cores. The flush thread spreads its COPYs
    # over FLUSH_SPREAD of the interval; a flush that waits for it (an audit query's) ends the spread.
    from git_credential_codestore.agent import grants as g

    monkeypatch.setattr(g, "FLUSH_INTERVAL", 4.0)
    store = g.GrantStore(str(tmp_path / "state"), pg_url).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    store.on_flush = log.flush_into
    copies: list[float] = []
    real = db._Watched.copy_rows

    def copy_rows(self: db._Watched, statement: str, types: Any, rows: Any) -> None:
        copies.append(time.monotonic())
        real(self, statement, types, rows)

    monkeypatch.setattr(db._Watched, "copy_rows", copy_rows)
    try:
        for i in range(40 * db.PG_COPY_ROWS):
            log.record("mint", {"grant": f"g{i % 7}", "sub": "s", "repo": "team/app", "result": "ok", "ttl": i})
        store.start()
        assert wait_for(lambda: len(copies) >= 10, timeout=10)
        # 40 COPYs spread over 3 s (FLUSH_PAUSE_MAX apart at most): 10 of them took 0.1 s or more;
        # back to back, a few milliseconds each.
        assert copies[9] - copies[0] > 0.1, copies[:10]
        t0 = time.monotonic()
        store.flush()  # waits for the flush thread's, which then goes on at once
        assert time.monotonic() - t0 < 0.5
        assert log.buffered == 0 and len(copies) == 41  # the rows' 40 COPYs and their spans' one
    finally:
        store.close()
        log.close()


def test_on_postgresql_a_paced_flush_survives_a_short_idle_in_transaction_timeout(tmp_path: Path, pg_url: str) -> None:
    # A paced flush's transaction waits up to FLUSH_PAUSE_MAX between its COPYs. A server (or
    # a managed service) whose idle_in_transaction_session_timeout is shorter ended the
    # session in a pause: every flush failed, and the audit rows stayed in the buffer for good.
    # The agent's sessions set their own.
    import psycopg

    from git_credential_codestore.agent import grants as g

    with psycopg.connect(pg_url, autocommit=True) as admin_conn:
        name = admin_conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        admin_conn.execute(f'ALTER DATABASE "{name}" SET idle_in_transaction_session_timeout = \'5ms\'')
    store = g.GrantStore(str(tmp_path / "state"), pg_url).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    store.on_flush = log.flush_into
    try:
        for i in range(8 * db.PG_COPY_ROWS):
            log.record("mint", {"grant": f"g{i % 7}", "sub": "s", "repo": "team/app", "result": "ok", "ttl": i})
        store.flush(until=time.monotonic() + 0.5)  # paced: pauses of up to FLUSH_PAUSE_MAX
        assert log.buffered == 0
        assert len(agent_audit.search(store.db, audit.Query(event="mint"), 10_000)[0]) == 8 * db.PG_COPY_ROWS
    finally:
        store.close()
        log.close()


@pytest.mark.parametrize("sub", ["\ud800", "a\x00b", "two\nlines"], ids=["lone-surrogate", "nul", "line-break"])
def test_a_sub_no_database_can_store_is_refused_as_bad_input(agent: Agent, sub: str) -> None:
    # A lone surrogate (valid JSON) was a 500 "internal error" (no driver can encode it);
    # a NUL was stored by SQLite and a 503 "the grant store failed" on PostgreSQL.
    status, reply = admin(agent, "POST", "/v1/grants", {"repos": [REPO], "sub": sub})
    assert status == 400 and "--sub" in reply["error"], reply
    report: dict[str, object] = {"event": "push", "repo": REPO, "refs": [{"ref": "refs/heads/main", "new": "a" * 40, "result": "ok"}], "owner_sub": sub}
    status, reply = admin(agent, "POST", "/v1/audit/report", report)
    assert status == 201, reply  # recorded under the owner's configured sub


def test_a_sub_may_hold_unicode_spaces_as_on_the_wire(agent: Agent) -> None:
    status, reply = admin(agent, "POST", "/v1/grants", {"repos": [REPO], "sub": "équipe\u00a07"})
    assert status == 201 and reply["sub"] == "équipe\u00a07", reply
