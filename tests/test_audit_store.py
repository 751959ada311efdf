"""The audit trail lives in the agent's database: every replica's records, read by any replica.

Real agents (the installed `codestore agent serve`, in subprocesses), real git pushes
through the codestore:// remote helper to the dev server, a real PostgreSQL shared by two
replicas, the embedded SQLite for one agent; `codestore audit` and `codestore review`
are the installed CLI asking one replica.
"""

from __future__ import annotations

import calendar
import collections
import contextlib
import errno
import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from git_credential_codestore import audit
from git_credential_codestore.agent import audit as agent_audit
from git_credential_codestore.agent import db
from git_credential_codestore.agent.client import AgentRefused, Endpoint, call, exchange
from git_credential_codestore.agent.db import Database, Tx
from git_credential_codestore.agent.grants import GrantStore
from git_credential_codestore.errors import RemoteError
from tests.conftest import DevServer, OrgKey, commit, git, run_cli, wait_for
from tests.test_agent import REPO, Agent, mint, sandbox_env, start_agent
from tests.test_agent_e2e import seed_repo
from tests.test_agent_store import create, replica


def owner_env(agent: Agent) -> dict[str, str]:
    """The owner's CLI talking to this replica only."""
    return dict(agent.env, CODESTORE_AGENT_SOCK=agent.socket)


def audit_via(agent: Agent, *args: str) -> list[dict[str, Any]]:
    proc = run_cli("codestore", "audit", "--json", *args, env=owner_env(agent))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def push_feat(tmp_path: Path, agent_url: str, grant: dict[str, object]) -> str:
    """A sandbox holding `grant` clones team/app+ephemeral and pushes a new branch `feat`."""
    env = sandbox_env(grant["grant"], url=agent_url)
    work = tmp_path / "work"
    git("clone", "-q", "--branch", "base", f"codestore://acme/{REPO}+ephemeral", str(work), env=env)
    commit(work, "feat.txt", env=env)
    proc = git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=work, env=env)
    assert "not in the audit trail" not in proc.stderr, proc.stderr
    return git("rev-parse", "HEAD", cwd=work).stdout.strip()


# -- one agent, the embedded SQLite ----------------------------------------------------------


def test_a_push_is_in_codestore_audit_at_once_from_the_agents_database(
    tmp_path: Path, dev_server: DevServer, org_key: OrgKey
) -> None:
    seed_repo(dev_server, tmp_path)
    a = start_agent(tmp_path)
    try:
        g = create(a, scopes=["git:read", "git:write"], ephemeral_only=True, sub="sandbox-1")
        sha = push_feat(tmp_path, a.url, g)
        # The file is for tail -f; the query reads the database (the report may still sit in
        # the agent's buffer: the query flushes it first).
        a.audit_path.unlink()
        [push] = audit_via(a, "--repo", REPO, "--event", "push")
        assert (push["grant"], push["sub"], push["ephemeral"]) == (g["id"], "sandbox-1", True)
        assert [(r["ref"], r["new"], r["result"]) for r in push["refs"]] == [("refs/heads/feat", sha, "ok")]
        everything = audit_via(a)
        assert [e["event"] for e in everything].count("push") == 1  # nothing listed twice
        assert [e["event"] for e in everything].count("grant-create") == 1
        assert [e["event"] for e in audit_via(a, "--ref", "feat")] == ["push"]
        assert audit_via(a, "--ref", "other") == []
    finally:
        a.stop()


# -- two replicas on one PostgreSQL -----------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path, dev_server: DevServer, org_key: OrgKey, pg_url: str) -> Iterator[tuple[Agent, Agent]]:
    seed_repo(dev_server, tmp_path)
    a, b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_a_push_through_replica_a_is_in_codestore_audit_and_explained_in_review_asking_replica_b(
    fleet: tuple[Agent, Agent], tmp_path: Path
) -> None:
    a, b = fleet
    g = create(a, scopes=["git:read", "git:write"], ephemeral_only=True, sub="sandbox-a")
    sha = push_feat(tmp_path, a.url, g)
    # A commits a push report before acknowledging it: B lists it at once.
    [push] = audit_via(b, "--ref", "feat")
    assert (push["grant"], push["sub"], push["refs"][0]["new"]) == (g["id"], "sandbox-a", sha)
    assert [e["event"] for e in audit_via(a, "--event", "push")] == ["push"]  # and once on A too
    proc = run_cli("codestore", "review", REPO, "feat", "--json", env=owner_env(b))
    assert proc.returncode == 0, proc.stderr
    review = json.loads(proc.stdout)
    assert review["sha"] == sha and review["explained"] is True
    assert [p["grant"] for p in review["pushes"]] == [g["id"]]


def test_a_mint_and_a_refusal_on_replica_a_are_in_the_trail_asked_of_replica_b(fleet: tuple[Agent, Agent]) -> None:
    a, b = fleet
    g = create(a, scopes=["git:read"], sub="sandbox-m")
    env = sandbox_env(g["grant"], url=a.url)
    mint(env)
    with pytest.raises(AgentRefused):
        mint(env, scopes=("git:write",))

    def on_b() -> list[dict[str, Any]]:
        return audit_via(b, "--grant", str(g["id"]))

    assert wait_for(lambda: {"mint", "refuse"} <= {e["event"] for e in on_b()}, timeout=15)
    events = on_b()
    assert [e["event"] for e in events] == ["grant-create", "mint", "refuse"]
    assert events[1]["sub"] == "sandbox-m" and events[1]["scopes"] == ["git:read"]
    assert "git:write" in events[2]["reason"]


# A push report (POST /v1/audit/report) of one ref, for the tests with the database away.
_LATE_PUSH = {"event": "push", "repo": REPO, "ephemeral": True,
              "refs": [{"ref": "refs/heads/late", "old": audit.ZERO, "new": "b" * 40, "result": "ok"}]}


def test_with_the_database_away_and_the_file_full_a_report_is_refused_as_not_recorded(
    tmp_path: Path, org_key: OrgKey, postgres: Any, pg_url: str
) -> None:
    # A report the database cannot take waits in the file and the buffer. Threat: with the
    # file failing too, a 500 "internal error" (or, before 55fc792, a 201 and a row with no
    # line): the reporter must hear that nothing recorded the push, in one line.
    a = replica(tmp_path, "a", pg_url, extra=("--audit-log", "/dev/full"))
    sock = Endpoint("unix", a.socket)
    report = _LATE_PUSH
    try:
        postgres.stop()
        try:
            status, reply = call(sock, "POST", "/v1/audit/report", report, env=a.env)
        finally:
            postgres.start()
        error = str(reply["error"])
        assert status == 503 and "the push is not recorded; report it again" in error and "\n" not in error, reply
        assert "No space left on device" in error and "/dev/full" not in error  # a sandbox: what failed, not the agent's paths
    finally:
        a.stop()


def test_with_the_database_away_a_query_is_refused_in_one_line_and_a_report_is_kept_for_later(
    tmp_path: Path, org_key: OrgKey, postgres: Any, pg_url: str
) -> None:
    a = replica(tmp_path, "a", pg_url)
    sock = Endpoint("unix", a.socket)
    report = _LATE_PUSH
    try:
        postgres.stop()
        try:
            status, reply = call(sock, "POST", "/v1/audit/query", {}, env=a.env)
            assert status == 503
            assert "cannot read the audit trail" in str(reply["error"]) and "\n" not in str(reply["error"])
            status, _ = call(sock, "POST", "/v1/audit/report", report, env=a.env)
            assert status == 201  # the push happened: its record waits in the file and the buffer
        finally:
            postgres.start()

        def listed() -> list[object]:
            status, reply = call(sock, "POST", "/v1/audit/query", {"ref": "late"}, env=a.env)
            return reply["entries"] if status == 200 else []  # type: ignore[return-value]  # JSON

        assert wait_for(lambda: len(listed()) == 1, timeout=30)
        assert len(listed()) == 1
    finally:
        a.stop()


# -- the query itself, against both databases --------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = str(tmp_path / "agent.sqlite3") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    d = Database(url).open()
    yield d
    d.close()


def recorded(d: Database, tmp_path: Path, entries: list[tuple[str, dict[str, object]]]) -> None:
    """Each entry in a flush of its own: the table's order is the list's (a flush of many
    groups them by grant, test_a_flush_writes_its_rows_grouped_by_grant...)."""
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    for event, fields in entries:
        log.record(event, fields)
        with d.transaction() as tx:
            done = log.flush_into(tx)
        done()
    log.close()


def push_entry(repo: str, ref: str, sub: str) -> tuple[str, dict[str, object]]:
    return "push", {"grant": "g1", "sub": sub, "repo": repo, "ephemeral": True,
                    "refs": [{"ref": ref, "old": audit.ZERO, "new": "a" * 40, "result": "ok"}]}


def test_the_query_filters_by_every_field_and_pages_newest_last(database: Database, tmp_path: Path) -> None:
    recorded(database, tmp_path, [
        ("mint", {"grant": "g1", "sub": "s1", "repo": "team/app", "ttl": 1}),
        ("mint", {"grant": "g2", "sub": "s2", "repo": "team/lib", "ttl": 2}),
        push_entry("team/app", "refs/heads/feat", "s1"),
        ("refuse", {"grant": "g2", "sub": "s2", "repo": "team/app", "reason": "no"}),
        push_entry("team/app", "refs/heads/main", "s1"),
        ("mint", {"grant": "g1", "sub": "s1", "repo": "team/app", "ttl": 3}),
    ])

    def find(limit: int = 100, before: int | None = None, **q: str) -> tuple[list[dict[str, Any]], int | None]:
        return agent_audit.search(database, audit.Query(**q), limit, before)

    assert [e.get("ttl") for e in find(event="mint")[0]] == [1, 2, 3]
    assert [e["event"] for e in find(repo="team/app")[0]] == ["mint", "push", "refuse", "push", "mint"]
    assert [e.get("ttl") for e in find(sub="s2")[0]] == [2, None]
    assert [e["event"] for e in find(grant="g2")[0]] == ["mint", "refuse"]
    [feat] = find(ref="feat")[0]
    assert feat["refs"][0]["ref"] == "refs/heads/feat"
    assert find(repo="team/lib", ref="feat")[0] == []
    assert len(find(since="1h")[0]) == 6
    assert find(until="2000-01-01")[0] == [] and find(since="2999-01-01")[0] == []
    # Pages: the newest first, each page oldest to newest; the cursor walks back, no entry twice.
    page, more = find(limit=4)
    assert [e["event"] for e in page] == ["push", "refuse", "push", "mint"] and more is not None
    older, rest = find(limit=4, before=more)
    assert [e.get("ttl") for e in older] == [1, 2] and rest is None


@pytest.mark.parametrize(("field", "index"), [("repo", "audit_spans_at_repo"), ("grant", "audit_spans_at_grant"),
                                              ("sub", "audit_spans_at_sub"), ("event", "audit_event"), ("ref", "audit_event")])
def test_each_filter_is_answered_from_an_index(tmp_path: Path, field: str, index: str) -> None:
    # With many mints, a query must not read the whole table to find one sandbox's rows:
    # grant, sub and repo through the areas they have spans in, then those areas' buckets on
    # the spans' indexes (or the spans without a bucket on their own), then the spans' rows by id.
    d = Database(str(tmp_path / "agent.sqlite3")).open()
    try:
        query = audit.Query(**{field: "feat" if field == "ref" else "x"})
        if field in ("repo", "grant", "sub"):
            selects = [(agent_audit.areas_statement(query, 1 << 30, 10), "sqlite_autoindex_audit_span_areas_1"),
                       (agent_audit.spans_statement(query, 1 << 30, 10, [9]), index),
                       (agent_audit.spans_statement(query, 1 << 30, 10, [9, 8, 7]), index),
                       (agent_audit.spans_statement(query, 1000, 10), f"audit_unbucketed_{field}"),
                       (agent_audit.statement(query, 1000, 10, unspanned=True), f"audit_unspanned_{field}")]
        else:
            selects = [(agent_audit.statement(query, 1000, 10), index)]
        for (sql, params), used in selects:
            with d.transaction(write=False) as tx:
                plan = " ".join(str(row[-1]) for row in tx.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert f"USING INDEX {used}" in plan or f"USING COVERING INDEX {used}" in plan, plan
            assert "SCAN audit_spans" not in plan, plan
        if field in ("repo", "grant", "sub"):
            # one bucket: its spans in the index's order, read until the limit, not all sorted
            sql, params = agent_audit.spans_statement(query, 1 << 30, 10, [9])
            with d.transaction(write=False) as tx:
                plan = " ".join(str(row[-1]) for row in tx.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "TEMP B-TREE" not in plan, plan
            sql, params = agent_audit.rows_statement(query, 1000, [(900, 950), (800, 801)], 10)
            with d.transaction(write=False) as tx:
                plan = " ".join(str(row[-1]) for row in tx.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "SEARCH a USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan
    finally:
        d.close()


def _ttls_paged(d: Database, limit: int, **q: str) -> list[int]:
    """The `ttl` of every entry a query finds, page by page of `limit` through its cursor, oldest first."""
    got: list[int] = []
    before = None
    while True:
        page, before = agent_audit.search(d, audit.Query(**q), limit, before)
        got[:0] = [e["ttl"] for e in page]
        if before is None:
            return got


def test_a_query_on_grant_sub_or_repo_reads_exact_spans_and_pages_through_them(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Grant, sub and repo are found through spans of consecutive ids, not an index entry a row.
    # Spans must hold only their group's rows, also when another writer took ids between
    # this one's (here every fourth id, as another replica's flush on PostgreSQL may), and a
    # query must page across them (three rows a span at most) as it did on the row indexes,
    # together with the rows of a replica that writes no spans (not yet upgraded). Buckets
    # of four ids and areas of four buckets, so that a page crosses buckets and areas.
    monkeypatch.setattr(agent_audit, "SPAN_ROWS", 3)
    monkeypatch.setattr(agent_audit, "BUCKET_BITS", 2)
    monkeypatch.setattr(agent_audit, "AREA_BITS", 4)
    monkeypatch.setattr(agent_audit, "_AREAS_AT_ONCE", 2)
    real = Tx.new_ids
    foreign: list[int] = []

    def new_ids(self: Tx, table: str, n: int) -> list[int]:
        ids = real(self, table, n + n // 3)
        foreign.extend(ids[3::4])
        return [i for i in ids if i not in ids[3::4]][:n]

    monkeypatch.setattr(Tx, "new_ids", new_ids)
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    for flush in range(4):
        for n in range(30):
            fields = {"grant": f"g{n % 3}", "sub": f"s{n % 2}", "repo": "team/app" if n % 5 else "team/lib", "ttl": 100 * flush + n}
            log.record("refuse" if n % 2 else "mint", fields)
        with database.transaction() as tx:
            done = log.flush_into(tx)
            taken = [i for i in foreign if i > 0]
            # another writer's rows in the ids this one left out, of another group
            tx.execute_rows("INSERT INTO audit (id, time, event, grant_id, sub, repo, result, replica, fields) SELECT * FROM {rows}",
                            ("bigint", "bigint", "text", "text", "text", "text", "text", "text", "text"),
                            [(i, int(time.time()), "mint", "g9", "s9", "team/app", "ok", "other:1", "{}") for i in taken])
            foreign[:] = []
            # and a replica not yet upgraded: its rows have no spans
            tx.insert_rows(agent_audit._TABLE, agent_audit._TYPES, [
                (int(time.time()), event, grant, sub, "team/app", "ok", "old:1",
                 json.dumps({"event": event, "grant": grant, "sub": sub, "repo": "team/app", "ttl": 1000 + 100 * flush + n}))
                for n in range(7) for event, grant, sub in [("refuse" if n % 2 else "mint", f"g{n % 3}", f"s{n % 2}")]])
        done()
    log.close()
    with database.transaction(write=False) as tx:
        strays = tx.execute("SELECT count(*) FROM audit_spans s JOIN audit a ON a.id >= s.first_id AND a.id <= s.last_id "
                            "WHERE a.grant_id <> s.grant_id OR a.sub <> s.sub OR a.repo <> s.repo OR a.replica = 'other:1'")
        longest = tx.execute("SELECT max(last_id - first_id + 1) FROM audit_spans")
        table = [json.loads(str(f)) for f, in tx.execute("SELECT fields FROM audit WHERE replica <> 'other:1' ORDER BY id")]
        buckets = tx.execute("SELECT count(DISTINCT bucket), count(*) FROM audit_spans WHERE bucket = first_id / 4")
        areas = tx.execute("SELECT count(DISTINCT area) FROM audit_span_areas WHERE kind = 'grant' AND value = 'g1'")
        spans = tx.execute("SELECT count(*) FROM audit_spans")
    assert strays[0][0] == 0 and int(longest[0][0]) <= 3  # type: ignore[call-overload]
    assert int(buckets[0][0]) >= 20 and buckets[0][1] == spans[0][0] and int(areas[0][0]) >= 5, (buckets, areas)  # type: ignore[call-overload]

    # Each page is shown in time order, and a flush's rows may straddle a second: compared as sets.
    for q in ({"grant": "g1"}, {"grant": "g2", "event": "refuse"}, {"grant": "g0", "sub": "s1", "repo": "team/app"},
              {"repo": "team/lib"}, {"sub": "s0", "event": "mint"}):
        want = sorted(e["ttl"] for e in table if audit.Query(**q).matches(e))
        assert len(want) >= 4 and sorted(_ttls_paged(database, 3, **q)) == want and sorted(_ttls_paged(database, 100, **q)) == want, q


def _write_as(version: int, tx: Tx, rows: Sequence[tuple[object, ...]]) -> None:
    """`rows` written as a replica of the audit schema's `version` did: 2, without spans; 3,
    with spans but no bucket; the current, through `insert`."""
    if version == 2:
        tx.insert_rows(agent_audit._TABLE, agent_audit._TYPES, rows)
    elif version == 3:
        ids = tx.new_ids("audit", len(rows))
        tx.insert_rows(agent_audit._NUMBERED, ("bigint", "bigint", *agent_audit._TYPES), [(i, 1, *r) for i, r in zip(ids, rows, strict=True)])
        tx.insert_rows("audit_spans (first_id, last_id, grant_id, sub, repo)", ("bigint", "bigint", "text", "text", "text"),
                       [span[:5] for span in agent_audit._spans(ids, rows)])
    else:
        agent_audit.insert(tx, rows)


@pytest.mark.parametrize("since", [2, 3])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rows_written_before_spans_or_buckets_are_found_by_grant_sub_and_repo_after_the_upgrade(
        kind: str, since: int, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # An agent's database from before spans (the audit schema's version 2, one index entry a
    # row on grant, sub and repo) or before buckets (version 3, spans indexed by grant, sub
    # and repo) is upgraded at start: its rows are found as before. So are the rows replicas
    # not yet upgraded go on writing the old ways, among new rows.
    url = str(tmp_path / "agent.sqlite3") if kind == "sqlite" else request.getfixturevalue("pg_url")
    with monkeypatch.context() as m:
        m.setitem(db.MIGRATIONS, "audit", db.MIGRATIONS["audit"][:since])
        old = Database(url).open()
        with old.transaction() as tx:
            _write_as(since, tx, [
                (int(time.time()), "mint", f"g{n % 3}", f"s{n % 2}", f"team/r{n % 5}", "ok", "old:1",
                 json.dumps({"event": "mint", "grant": f"g{n % 3}", "sub": f"s{n % 2}", "repo": f"team/r{n % 5}", "ttl": n}))
                for n in range(40)])
        old.close()
    monkeypatch.setattr(agent_audit, "BUCKET_BITS", 2)  # the new rows in several buckets and areas
    monkeypatch.setattr(agent_audit, "AREA_BITS", 4)
    d = Database(url).open()
    try:
        with d.transaction(write=False) as tx:
            version = tx.execute("SELECT version FROM codestore_schema WHERE component = 'audit'")[0][0]
        assert version == len(db.MIGRATIONS["audit"])
        for q, want in (({"grant": "g1"}, [n for n in range(40) if n % 3 == 1]),
                        ({"sub": "s0", "repo": "team/r2"}, [n for n in range(40) if n % 2 == 0 and n % 5 == 2])):
            entries, more = agent_audit.search(d, audit.Query(**q), 100)
            assert [e["ttl"] for e in entries] == want and more is None
        # Turns of an upgraded writer and of writers of both older versions.
        for turn in range(9):
            rows = [(int(time.time()), "mint", "g1", "s1", "team/r1", "ok", "w:1",
                     json.dumps({"event": "mint", "grant": "g1", "sub": "s1", "repo": "team/r1", "ttl": 1000 + 100 * turn + n}))
                    for n in range(7)]
            with d.transaction() as tx:
                _write_as((2, 3, 4)[turn % 3], tx, rows)
        newer = [1000 + 100 * turn + n for turn in range(9) for n in range(7)]
        for q, want in (({"grant": "g1"}, [n for n in range(40) if n % 3 == 1] + newer),
                        ({"sub": "s1", "repo": "team/r1"}, [n for n in range(40) if n % 2 == 1 and n % 5 == 1] + newer)):
            for limit in (3, 8, 100):
                got = _ttls_paged(d, limit, **q)
                assert sorted(got) == sorted(want) and len(got) == len(want), (q, limit)
    finally:
        d.close()


def _span_indexes(tx: Tx) -> list[tuple[str, str, str]]:
    """Each index of `audit_spans`, as the database's catalog has it: (name, its columns, its condition or "true")."""
    if tx.dialect == "postgresql":
        found = tx.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'audit_spans'")
    else:
        found = tx.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_spans' AND sql IS NOT NULL")
    indexes = []
    for name, sql in found:
        m = re.search(r" ON \S+ (?:USING \w+ )?\(([^)]*)\)(?: WHERE (.*))?$", str(sql))
        assert m, sql
        indexes.append((str(name), m.group(1), m.group(2) or "true"))
    return indexes


def test_a_flushs_spans_are_neighbours_in_each_index_of_the_spans(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A flush's spans (one a grant in use) must lie together in every index the spans are
    # written to, among spans of about their age, not each beside its grant's older spans.
    # Indexed by grant first, a second's 1000 spans reached 1000 leaf pages of each index of
    # a store that had served a while: the agent wrote twice the bytes a token it wrote with 10.
    # Buckets of 64 ids here: each flush's 60 rows are in a bucket or two.
    monkeypatch.setattr(agent_audit, "BUCKET_BITS", 6)
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    try:
        for _ in range(10):
            for n in range(60):
                log.record("mint", {"grant": f"g{n % 20}", "sub": f"s{n % 20}", "repo": f"team/r{n % 20}", "ttl": 1})
            with database.transaction() as tx:
                log.flush_into(tx)()
    finally:
        log.close()
    with database.transaction(write=False) as tx:
        last = int(tx.execute("SELECT max(id) FROM audit")[0][0])  # type: ignore[call-overload]
        written = 0
        for name, columns, condition in _span_indexes(tx):
            # the index's entries in its own order: those of new spans (its condition holds for them)
            order = [int(r[0]) for r in tx.execute(f"SELECT first_id FROM audit_spans WHERE {condition} ORDER BY {columns}")]  # type: ignore[call-overload]
            if not order:
                continue
            written += 1
            at = [i for i, first in enumerate(order) if first > last - 60]
            assert len(at) == 20, (name, order)
            between = order[at[0]:at[-1] + 1]
            assert min(between) > last - 60 - 128, (name, between)  # none older than the bucket before
        assert written == 3


def test_a_writer_lists_an_area_once_it_is_committed_and_again_after_a_rollback(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A grant's areas are listed by the first flush with spans in them; a writer does not list
    # them again (1000 grants in use would be 3000 lookups a second), but only once the flush
    # that listed them has committed: a rolled-back flush's areas are not there.
    listed: list[int] = []
    real = Tx.execute_rows

    def execute_rows(self: Tx, sql: str, types: Any, rows: Any, per: int = db.ROWS_PER_STATEMENT) -> None:
        if "audit_span_areas" in sql:
            listed.append(len(rows))
        real(self, sql, types, rows, per)

    monkeypatch.setattr(Tx, "execute_rows", execute_rows)
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    try:
        for ttl in (1, 2):  # two rows a flush: PostgreSQL writes a lone row in one statement of its own
            log.record("mint", {"grant": "g1", "sub": "s1", "ttl": ttl})
        with pytest.raises(RuntimeError), database.transaction() as tx:
            log.flush_into(tx)
            raise RuntimeError("the flush fails after its insert")
        assert listed == [2] and log.buffered == 2
        for ttl in (3, 4):
            log.record("mint", {"grant": "g1", "sub": "s1", "ttl": ttl})
            log.record("mint", {"grant": "g1", "sub": "s1", "ttl": ttl + 2})
            with database.transaction() as tx:
                log.flush_into(tx)()
        assert listed == [2, 2, 0]  # listed again after the rollback, then not
    finally:
        log.close()
    assert sorted(e["ttl"] for e in agent_audit.search(database, audit.Query(grant="g1"), 10)[0]) == [1, 2, 3, 4, 5, 6]
    assert sorted(e["ttl"] for e in agent_audit.search(database, audit.Query(sub="s1"), 10)[0]) == [1, 2, 3, 4, 5, 6]


def _refusals_behind_mints(database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, refusals: int,
                           mints_of: Callable[[int], str]) -> None:
    """`refusals` of sub s1 (ttl 0, 1, ...), then 400 of its mints in 10 flushes (ttl 100 on, the
    n-th of a flush under grant mints_of(n)), with a scan limit of 100 rows a query."""
    monkeypatch.setattr(agent_audit, "MAX_SCAN", 100)
    monkeypatch.setattr(agent_audit, "SPAN_SCAN", 30)
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    try:
        for n in range(refusals):
            log.record("refuse", {"grant": "g1", "sub": "s1", "ttl": n})
        for flush in range(10):
            for n in range(40):
                log.record("mint", {"grant": mints_of(n), "sub": "s1", "ttl": 100 + 40 * flush + n})
            with database.transaction() as tx:
                log.flush_into(tx)()
    finally:
        log.close()


def test_a_query_by_sub_and_event_stops_at_the_scan_limit_with_a_cursor_and_loses_nothing(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Refusals of a sandbox with many mints: SQL reads the mints' spans and keeps none. That
    # reading counts toward MAX_SCAN, so the reply stops there with a cursor instead of reading
    # the whole trail (a page of `limit` rows at a time: 4.4 s for 2M rows); and the cursor
    # leads, page by page, to the one refusal at the far end.
    _refusals_behind_mints(database, tmp_path, monkeypatch, refusals=1, mints_of=lambda n: f"g{n % 2}")
    entries, more = agent_audit.search(database, audit.Query(sub="s1", event="refuse"), 5)
    assert entries == [] and more is not None
    pages = 1
    while more is not None:
        page, more = agent_audit.search(database, audit.Query(sub="s1", event="refuse"), 5, more)
        entries += page
        pages += 1
    assert [e["ttl"] for e in entries] == [0] and 3 <= pages <= 6, pages


def test_codestore_audit_follows_a_cut_short_reply_to_the_matches_beyond_it(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat (a wrong answer): `codestore audit --sub S --event refuse` on a sandbox with 210k
    # mints after its refusals printed "no matching entries": the agent's reply stopped at
    # MAX_SCAN with a cursor, and the CLI read it as the whole answer. The agent's own handler
    # answers here (report.query on a real database); only the HTTP hop is left out.
    from types import SimpleNamespace

    from git_credential_codestore.agent import client, report

    _refusals_behind_mints(database, tmp_path, monkeypatch, refusals=3, mints_of=lambda n: "g1")
    agent = SimpleNamespace(store=SimpleNamespace(flush=lambda: None, db=database, where="test"), audit=SimpleNamespace(path="-"))
    asked: list[object] = []

    def call_any(endpoints: list[Endpoint], method: str, path: str, body: dict[str, object], **_: object) -> object:
        asked.append(body.get("before"))
        return endpoints[0], *report.query(agent, None, None, body)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "call_any", call_any)
    env = {"CODESTORE_AGENT_SOCK": str(tmp_path / "agent.sock"), "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    entries, _ = audit.collect(audit.Query(sub="s1", event="refuse"), env, limit=2)
    assert [e["ttl"] for e in entries] == [1, 2] and asked[0] is None and len(asked) >= 3, asked
    entries, _ = audit.collect(audit.Query(sub="s1", event="refuse"), env, limit=50)
    assert [e["ttl"] for e in entries] == [0, 1, 2]

    # A cursor that does not go back would be followed forever: one line instead.
    def stuck(endpoints: list[Endpoint], method: str, path: str, body: dict[str, object], **_: object) -> object:
        return endpoints[0], 200, {"entries": [], "truncated": True, "before": 7}

    monkeypatch.setattr(client, "call_any", stuck)
    with pytest.raises(RemoteError, match="cursor that does not go back"):
        audit.collect(audit.Query(sub="s1", event="refuse"), env, limit=2)


def test_a_secret_in_any_field_a_caller_chose_is_written_redacted(database: Database, tmp_path: Path) -> None:
    # A grant holder asking for repo=<its own secret> (or a JWT), or a ref rule naming one:
    # the refusal's reason was redacted, but its `repo` held the whole secret, and so did a
    # mint's `refs`, in the file and in the table.
    secret = "csg_0123456789ab_" + "S3cr3tRandomPart" * 2
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    path = tmp_path / "audit.log"
    log = agent_audit.AuditLog(str(path))
    try:
        log.record("refuse", {"grant": "0123456789ab", "sub": "s1", "repo": secret, "reason": f"does not cover {secret}"})
        log.record("refuse", {"grant": "0123456789ab", "sub": "s1", "repo": token})
        log.emit(log.prepare("mint", {"grant": "0123456789ab", "sub": "s1", "repo": "team/app",
                                      "refs": ((f"refs/heads/{secret}", ("no-push",)),)}))
        log.record("mint", {"grant": "0123456789ab", "sub": "s1", "repo": "team/app", "purpose": "fetch"})
        with database.transaction() as tx:
            log.flush_into(tx)()
    finally:
        log.close()
    with database.transaction(write=False) as tx:
        rows = [str(r[0]) + str(r[1]) for r in tx.execute("SELECT repo, fields FROM audit")]
    written = path.read_text() + "".join(rows)
    assert "S3cr3tRandomPart" not in written and "eyJzdWIi" not in written, written
    assert written.count("csg_0123456789ab_<redacted>") >= 4  # which grant leaked stays readable
    assert '"repo":"team/app"' in path.read_text() and '"purpose":"fetch"' in path.read_text()  # the rest as it was


def test_flushes_running_together_write_each_buffered_row_once(database: Database, tmp_path: Path) -> None:
    # An audit query flushes while the sync thread may be flushing too.
    store = GrantStore(str(tmp_path / "state"), database.url).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    store.on_flush = log.flush_into
    try:
        for n in range(2000):
            log.record("mint", {"grant": "g1", "ttl": n})
        threads = [threading.Thread(target=store.flush) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entries, _ = agent_audit.search(store.db, audit.Query(event="mint"), 2000)
        assert sorted(e["ttl"] for e in entries) == list(range(2000))
    finally:
        store.close()
        log.close()


def test_an_entry_is_encoded_once_and_each_record_has_its_own_time(tmp_path: Path) -> None:
    # A mint's entry is prepared once (the agent remembers it per grant and request) with a
    # stand-in for its time. Threat: a value that looks like the stand-in (a caller's repo,
    # sub or reason) taking the time's place, or moving it.
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    fields: dict[str, object] = {"grant": "g1", "sub": "\x00time", "repo": "\\u0000time", "reason": '"time":"x', "ttl": 1}
    entry = log.prepare("refuse", fields)
    first, row = entry.at(1_700_000_000)
    second, _ = entry.at(1_700_000_061)
    log.close()
    for line, stamp in ((first, "2023-11-14T22:13:20Z"), (second, "2023-11-14T22:14:21Z")):
        assert json.loads(line) == {"time": stamp, "event": "refuse", **fields, "replica": log.replica}
    # The line keeps every value; the sub column holds what both stores' text can (_text).
    assert row == (1_700_000_000, "refuse", "g1", "\ufffdtime", "\\u0000time", None, log.replica, first)


def test_a_flush_writes_the_rows_buffered_when_it_began_and_ends(tmp_path: Path) -> None:
    # On SQLite a flush is transactions of FLUSH_ROWS rows. Taking rows as they arrived, a
    # flush under load never ended: a transaction every few milliseconds with that moment's
    # few rows, each writing the same table and index pages again (seven page writes a row).
    store = GrantStore(str(tmp_path / "state"), None).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    before = 2 * agent_audit.FLUSH_ROWS + 10
    for n in range(before):
        log.record("mint", {"grant": "g1", "ttl": n})
    transactions = 0

    def on_flush(tx: Tx) -> Callable[[], int]:
        nonlocal transactions
        transactions += 1
        done = log.flush_into(tx)
        for n in range(20):  # arriving while the flush runs
            log.record("mint", {"grant": "g2", "ttl": n})
        return done

    store.on_flush = on_flush
    try:
        store.flush()
        assert transactions == 3 and log.buffered == 60
        entries, _ = agent_audit.search(store.db, audit.Query(event="mint"), 10 * before)
        assert sorted(e["ttl"] for e in entries) == list(range(before))
        store.on_flush = log.flush_into
        store.flush()  # the next flush takes the rows that came meanwhile
        assert log.buffered == 0
        assert len(agent_audit.search(store.db, audit.Query(event="mint", grant="g2"), 1000)[0]) == 60
    finally:
        store.close()
        log.close()


def test_a_flush_writes_its_rows_grouped_by_grant_each_in_the_order_they_came(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows as they came, from 1000 grants in use, put each of a transaction's 100 rows on a leaf
    # page of its own in each of the grant, sub and repo indexes: with two workers the load ran
    # at 0.78-0.81 of the 10-grant one (0.90-0.93 grouped). Grouping must lose no row, keep each
    # grant's order, and count the rows it holds against MAX_BUFFER and in `buffered`.
    monkeypatch.setattr(agent_audit, "MAX_BUFFER", 60)
    store = GrantStore(str(tmp_path / "state"), None).open()
    log = agent_audit.AuditLog(str(tmp_path / "audit.log"))
    for n in range(50):  # five grants, taking turns; the fifth's rows have a sub and no grant
        fields: dict[str, object] = {"grant": f"g{5 - n % 5}", "ttl": n} if n % 5 else {"sub": "w", "ttl": n}
        log.record("mint", fields)
    seen: list[int] = []

    def on_flush(tx: Tx) -> Callable[[], int]:
        done = log.flush_into(tx)
        for n in range(20):  # arriving while the flush holds the first 50: room for 10 more
            log.record("mint", {"grant": "late", "ttl": 100 + n})
        seen.append(log.buffered)
        return done

    store.on_flush = on_flush
    try:
        store.flush()
        assert seen == [60] and log.dropped == 10
        with store.db.transaction(write=False) as tx:
            rows = [(str(g or ""), json.loads(str(f))["ttl"]) for g, f in tx.execute("SELECT grant_id, fields FROM audit ORDER BY id")]
        # Each group's rows together, the groups in the order they first came.
        assert [g for g, _ in rows] == [g for g in ("", "g4", "g3", "g2", "g1") for _ in range(10)]
        for grant in ("", "g1", "g2", "g3", "g4"):
            ttls = [t for g, t in rows if g == grant]
            assert ttls == sorted(ttls) and len(ttls) == 10
        store.on_flush = log.flush_into
        store.flush()  # the 10 that came meanwhile, in the next flush
        assert log.buffered == 0
        assert [e["ttl"] for e in agent_audit.search(store.db, audit.Query(grant="late"), 100)[0]] == list(range(100, 110))
    finally:
        store.close()
        log.close()


def _writer(path: Path, name: str) -> agent_audit.AuditLog:
    log = agent_audit.AuditLog(str(path))
    log.replica = name  # a process of its own, as each agent process is
    return log


def _rows_by_writer(d: Database) -> dict[object, list[object]]:
    with d.transaction(write=False) as tx:
        rows = tx.execute("SELECT replica, fields FROM audit ORDER BY id")
    found: dict[object, list[object]] = {}
    for writer, text in rows:
        found.setdefault(writer, []).append(text)
    return found


def test_records_a_killed_writer_left_only_in_the_file_are_added_once(database: Database, tmp_path: Path) -> None:
    # Threat: the audit trail missing the last second of mints of a process that was
    # SIGKILLed (or OOM-killed) before its flush: the file had them, the database never did.
    path = tmp_path / "audit.log"
    earlier = _writer(path, "host:100")  # a writer of an earlier run, an hour before: that run's next start was its to add
    for n in range(3):
        earlier._append(earlier.prepare("mint", {"grant": "g0", "ttl": n}).at(time.time() - 3600)[0])
    earlier.close()
    killed, stopped = _writer(path, "host:101"), _writer(path, "host:102")
    for n in range(12):
        killed.record("mint", {"grant": "g1", "ttl": n})
    with database.transaction() as tx:
        done = killed.flush_into(tx)
    done()
    with database.transaction() as tx:  # another replica's rows, between and after
        tx.insert_rows(agent_audit._TABLE, agent_audit._TYPES, [(int(time.time()), "mint", "g9", None, None, "ok", "other:7", "{}")] * 3)
    entry = killed.prepare("mint", {"grant": "g1", "ttl": 99})
    for _ in range(5):
        killed.emit(entry)  # the same record five times in one second: five records
    for n in range(13):
        killed.record("refuse", {"grant": "g1", "reason": "revoked", "ttl": n})
    for n in range(10):
        stopped.record("mint", {"grant": "g2", "ttl": n})
    with database.transaction() as tx:
        done = stopped.flush_into(tx)
    done()
    lines = path.read_text().splitlines()
    killed.close()  # unflushed: 18 records only in the file
    stopped.close()

    assert agent_audit.recover(database, str(path)) == 18
    rows = _rows_by_writer(database)
    assert "host:100" not in rows  # the table is read around the file's end only
    assert rows["host:101"] == [ln for ln in lines if '"replica":"host:101"' in ln]  # each once, in the file's order
    assert rows["host:102"] == [ln for ln in lines if '"replica":"host:102"' in ln]
    assert len(rows["other:7"]) == 3
    assert agent_audit.recover(database, str(path)) == 0  # again: nothing twice
    assert _rows_by_writer(database) == rows

    # A writer still alive holds the file: its records are its own flush's to write...
    live = _writer(path, "host:103")
    try:
        for n in range(4):
            live.record("mint", {"grant": "g3", "ttl": n})
        assert agent_audit.recover(database, str(path)) == 0
        assert "host:103" not in _rows_by_writer(database)
        # ...unless the one who asks knows it is dead (the parent of a worker that died).
        assert agent_audit.recover(database, str(path), {"host:103"}) == 4
        assert len(_rows_by_writer(database)["host:103"]) == 4
        assert agent_audit.recover(database, str(path), {"host:100"}) == 3  # named, any writer is read back
    finally:
        live.close()


def test_rows_flushed_long_after_their_time_are_counted_and_their_records_not_added_again(database: Database, tmp_path: Path) -> None:
    # Threat: duplicated mints in the audit trail. After the store was away, a writer's flush
    # numbers old records after rows of newer times; `recover` found a killed writer's rows
    # by bisecting ids on time, and such rows sent it past the ones it was looking for. The
    # records they stood for were added again (and again at each start) as if never stored.
    path = tmp_path / "audit.log"
    now = int(time.time())
    with database.transaction() as tx:  # another replica's older rows first
        tx.insert_rows(agent_audit._TABLE, agent_audit._TYPES, [(now - 200, "mint", "g9", None, None, "ok", "other:7", "{}")] * 50)
    killed = _writer(path, "host:400")
    # One flush after an outage: a group's recent records, then a group's from the outage
    # (older than the window recover reads), then one's from inside it, numbered late too.
    for grant, age, n in (("g1", 5, 10), ("g2", 500, 2000), ("g3", 45, 20)):
        entry = killed.prepare("mint", {"grant": grant})
        for _ in range(n):
            text, row = entry.at(now - age)
            killed._append(text)
            killed._hold(entry.group, row)
    while True:
        with database.transaction() as tx:
            done = killed.flush_into(tx)
        if done() == 0:
            break
    with database.transaction() as tx:  # the other replica goes on
        tx.insert_rows(agent_audit._TABLE, agent_audit._TYPES, [(now, "mint", "g9", None, None, "ok", "other:7", "{}")] * 10)
    for n in range(5):
        killed.record("mint", {"grant": "g1", "ttl": n})  # then it is killed before its next flush
    lines = path.read_text().splitlines()
    killed.close()

    with database.transaction(write=False) as tx:
        late = tx.execute("SELECT count(*) FROM audit WHERE late IS NOT NULL AND replica = 'host:400'")[0][0]
    assert late == 2020  # g2's and g3's: numbered 500 and 45 s after their time; g1's were not late
    assert agent_audit.recover(database, str(path)) == 5
    assert _rows_by_writer(database)["host:400"] == lines  # each record once, in the order written
    assert agent_audit.recover(database, str(path)) == 0  # and again at the next start
    with database.transaction(write=False) as tx:
        assert tx.execute("SELECT count(*) FROM audit WHERE replica = 'host:400'")[0][0] == 2035


def test_a_writer_killed_while_the_store_was_away_for_minutes_has_all_its_records_added(database: Database, tmp_path: Path) -> None:
    # Threat: the audit table missing minutes of mints. recover read back only a killed
    # writer's last 60 s of lines, so when the store had been away longer than that before
    # the kill, the records before them stayed in the file alone. A writer's flushes now say
    # how far its records are stored, and recover reads back from there.
    path = tmp_path / "audit.log"
    now = int(time.time())
    killed = _writer(path, "host:500")
    entry = killed.prepare("mint", {"grant": "g1"})
    stored = []
    for age in (400, 390, 380):  # flushed before the store went away
        text, row = entry.at(now - age)
        killed._append(text)
        stored.append(row)
    with database.transaction() as tx:
        agent_audit.insert(tx, stored)
        tx.execute(agent_audit._PROGRESS, ["host:500", now - 301, now - 300])  # its last flush began 300 s ago
    for age in range(299, -1, -10):  # then only the file took its records, until it was killed
        killed._append(entry.at(now - age)[0])
    lines = path.read_text().splitlines()
    killed.close()

    assert agent_audit.recover(database, str(path)) == 30  # 300 s of them, not the last 60
    assert _rows_by_writer(database)["host:500"] == lines  # each once
    assert agent_audit.recover(database, str(path)) == 0


def test_a_writer_killed_in_a_flush_or_a_recovery_cut_short_has_each_record_once(database: Database, tmp_path: Path) -> None:
    # A flush of several transactions (SQLite) killed after its first, then records held
    # after the flush began; and a recovery that stopped after its first transaction: the
    # records in the table are counted, the others added, none twice.
    path = tmp_path / "audit.log"
    killed = _writer(path, "host:510")
    for n in range(250):
        killed.record("mint", {"grant": "g1", "ttl": n})
    with database.transaction() as tx:
        done = killed.flush_into(tx)
    done()  # SQLite: 100 of 250 committed; PostgreSQL: all 250
    [(_, taking)] = agent_audit._progress(database, ["host:510"]).values()
    entry = killed.prepare("mint", {"grant": "g2"})
    later = []
    for n in range(10):  # held after the flush began (their time after its second): in no transaction of it
        text, row = entry.at(taking + 2 + n)
        killed._append(text)
        later.append(row)
    lines = path.read_text().splitlines()
    killed.close()
    assert agent_audit.recover(database, str(path)) == (160 if database.one_writer else 10)
    assert _rows_by_writer(database)["host:510"] == lines

    cut = _writer(path, "host:511")
    for n in range(30):
        cut._append(cut.prepare("mint", {"grant": "g3", "ttl": n}).at(time.time())[0])
    cut.close()
    lines = [ln for ln in path.read_text().splitlines() if '"replica":"host:511"' in ln]
    rows = [(calendar.timegm(time.strptime(ln[9:29], audit.TIME_FORMAT)), *agent_audit._columns(json.loads(ln)), ln) for ln in lines]
    with database.transaction() as tx:  # what recover's first transaction does, and then it is killed
        agent_audit.insert(tx, rows[:12], taking={"host:511": int(rows[-1][0])})  # type: ignore[call-overload]
    assert agent_audit.recover(database, str(path), {"host:511"}) == 18
    assert _rows_by_writer(database)["host:511"] == lines
    assert agent_audit.recover(database, str(path)) == 0


def test_a_grant_change_long_after_a_writers_last_flush_is_not_added_again(database: Database, tmp_path: Path) -> None:
    # A grant change's row is committed with the change, in its own transaction: it moves
    # its writer's progress too, or recover, looking for rows up to where the writer's last
    # flush began (minutes before), did not find it, and added the change's record again.
    path = tmp_path / "audit.log"
    now = int(time.time())
    log = _writer(path, "host:530")
    with database.transaction() as tx:
        tx.execute(agent_audit._PROGRESS, ["host:530", now - 201, now - 200])  # its last flush, minutes ago
    write, after = log.in_transaction("grant_create", {"grant": "g1", "sub": "ci"})
    with database.transaction() as tx:
        write(tx)
    assert after() is None
    log.close()
    assert agent_audit.recover(database, str(path)) == 0
    assert len(_rows_by_writer(database)["host:530"]) == 1


def test_a_namesakes_progress_does_not_hide_a_killed_writers_records(database: Database, tmp_path: Path) -> None:
    # Containers given one host name, each its own pid 1, are one writer by name: a namesake
    # that lives on keeps moving the progress past what the killed one had stored.
    path = tmp_path / "audit.log"
    now = int(time.time())
    killed = _writer(path, "agent:1")
    entry = killed.prepare("mint", {"grant": "g1"})
    for age in (30, 20, 10, 0):
        killed._append(entry.at(now - age)[0])
    killed.close()
    with database.transaction() as tx:
        tx.execute(agent_audit._PROGRESS, ["agent:1", now + 99, now + 100])
    assert agent_audit.recover(database, str(path)) == 4  # its last 60 s, as without progress


def test_a_flush_records_how_far_its_writers_records_are_stored(database: Database, tmp_path: Path) -> None:
    log = _writer(tmp_path / "audit.log", "host:501")
    try:
        before = int(time.time())
        for n in range(250):  # SQLite: three transactions of FLUSH_ROWS; the first says when it began, the last how far
            log.record("mint", {"grant": "g1", "ttl": n})
        with database.transaction() as tx:
            done = log.flush_into(tx)
        left = done()
        if database.one_writer:
            assert left == 2
            [(first_stored, first_taking)] = agent_audit._progress(database, ["host:501"]).values()
            assert first_stored == 0 and before <= first_taking <= int(time.time())  # nothing known stored yet
        while left:
            with database.transaction() as tx:
                done = log.flush_into(tx)
            left = done()
        progress = agent_audit._progress(database, ["host:501", "host:502"])
        assert progress.keys() == {"host:501"}
        stored, taking = progress["host:501"]
        assert before <= taking <= int(time.time()) and stored == taking - 1
    finally:
        log.close()


def test_a_record_with_a_number_or_a_list_where_a_column_takes_text_is_stored_as_text(database: Database, tmp_path: Path) -> None:
    # PostgreSQL's COPY takes a text column's value as a string only: a number there (from a
    # line `recover` reads back) failed the flush every time, and every row behind it waited.
    path = tmp_path / "audit.log"
    log = _writer(path, "host:200")
    log.record("mint", {"grant": 5, "sub": ["a"], "repo": True, "ttl": 1})
    with database.transaction() as tx:
        done = log.flush_into(tx)
    done()
    killed = _writer(path, "host:201")
    stamp = time.strftime(audit.TIME_FORMAT, time.gmtime())
    killed._append(json.dumps({"time": stamp, "event": "mint", "grant": 7, "sub": {"x": 1}, "repo": "team/app", "replica": "host:201"},
                              separators=(",", ":")))
    killed.close()
    log.close()
    assert agent_audit.recover(database, str(path)) == 1
    with database.transaction(write=False) as tx:
        got = tx.execute("SELECT grant_id, sub, repo, replica FROM audit ORDER BY id")
    assert got == [("5", None, None, "host:200"), ("7", None, "team/app", "host:201")]


def _foreign_line(replica: str, **fields: object) -> str:
    """An audit line as a writer of the file wrote it (JSON, ASCII: any code point escaped)."""
    return json.dumps({"time": time.strftime(audit.TIME_FORMAT, time.gmtime()), "event": "mint", **fields, "replica": replica},
                      separators=(",", ":"))


def test_a_line_read_back_with_a_nul_or_a_lone_surrogate_is_stored_with_u_fffd(database: Database, tmp_path: Path) -> None:
    # JSON's escapes make any code point: "\u0000" is a string PostgreSQL's text refuses,
    # "\ud800" one no store can hold as UTF-8. Read back by `recover`, the line failed its
    # transaction: on SQLite an unexpected UnicodeEncodeError (the agent did not start), on
    # PostgreSQL the whole recovery with it.
    path = tmp_path / "audit.log"
    killed = _writer(path, "host:300")
    killed._append(_foreign_line("host:300", grant="g\x00", sub="a\ud800b", repo="team/app"))
    killed._append(_foreign_line("host:300", grant="g2", sub="s2", repo="team/app"))
    killed.close()
    assert agent_audit.recover(database, str(path)) == 2
    with database.transaction(write=False) as tx:
        got = tx.execute("SELECT grant_id, sub, repo FROM audit ORDER BY id")
    assert got == [("g\ufffd", "a\ufffdb", "team/app"), ("g2", "s2", "team/app")]
    assert agent_audit.recover(database, str(path)) == 0  # counted as stored: nothing twice


def test_an_agent_starts_with_such_a_line_in_its_audit_file_and_stores_it(tmp_path: Path, org_key: OrgKey) -> None:
    # It stopped at start with "internal error (UnicodeEncodeError)", exit 3, until someone
    # found and mended the line.
    path = tmp_path / "agent-state" / "audit.log"
    path.parent.mkdir(mode=0o700)
    path.write_text(_foreign_line("host:301", grant="g1", sub="a\ud800b", repo=REPO) + "\n")
    path.chmod(0o600)
    a = start_agent(tmp_path)
    assert a.proc.poll() is None
    assert "added to the database 1 audit record(s)" in _stderr(a)
    assert _state_rows(a) == {"host:301": 1}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_query_for_a_value_no_entry_can_hold_is_bad_input_in_one_line(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest, org_key: OrgKey) -> None:
    # A filter with a lone surrogate was a 500 "internal error (UnicodeEncodeError)"; with a
    # NUL, on PostgreSQL, a 503 "cannot read the audit trail ... try again" that no retry mends.
    a = replica(tmp_path, "a", request.getfixturevalue("pg_url") if backend == "postgresql" else None)
    ep = Endpoint("unix", a.socket)
    try:
        for field, value in (("repo", "team/\ud800"), ("sub", "a\x00b"), ("grant", "g\x1b[2J"), ("event", "mint\n")):
            status, reply = exchange(ep, "POST", "/v1/audit/query", json.dumps({field: value}).encode(), "application/json")
            error = json.loads(reply)["error"]
            assert status == 400 and error.startswith(f"--{field} takes text without control characters") and "\n" not in error, (status, error)
        status, reply = exchange(ep, "POST", "/v1/audit/query", json.dumps({"sub": "naïve ✓"}).encode(), "application/json")
        assert status == 200, reply  # any other text is a query, matching or not
    finally:
        a.stop()
    cli = run_cli("codestore", "audit", "--sub", "a\x01b", env=a.env)  # a usage error, as a bad --since is
    assert cli.returncode == 2 and "'--sub': --sub takes text without control characters" in cli.stderr, cli
    assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr, cli


def _state_rows(a: Agent) -> dict[object, int]:
    """Mint rows a writer in the stopped agent's SQLite store."""
    d = Database(str(a.state_dir / "agent.sqlite3")).open()
    try:
        with d.transaction(write=False) as tx:
            return dict(tx.execute("SELECT replica, count(*) FROM audit WHERE event = 'mint' GROUP BY replica"))  # type: ignore[arg-type]
    finally:
        d.close()


@contextlib.contextmanager
def _writes_held(a: Agent) -> Iterator[None]:
    """The SQLite store's write lock, held for the block: the agent's flushes fail and keep their rows."""
    conn = sqlite3.connect(str(a.state_dir / "agent.sqlite3"), isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.rollback()
        conn.close()


def _stderr(a: Agent) -> str:
    """What the agent said, once stopped (SIGTERM: a clean stop, every buffer flushed)."""
    a.proc.terminate()
    _, err = a.proc.communicate(timeout=30)
    return err


def test_mints_a_killed_agent_had_not_stored_are_in_the_trail_after_its_next_start(tmp_path: Path, org_key: OrgKey) -> None:
    a = start_agent(tmp_path)
    g = a.grant("--repo", REPO)
    env = sandbox_env(g["grant"], sock=a.socket)
    with _writes_held(a):
        for _ in range(8):
            mint(env)
        a.proc.kill()  # SIGKILL: 8 mints in its buffer
        a.proc.wait(10)
    assert sum(_state_rows(a).values()) == 0
    assert "added to the database 8 audit record(s)" in _stderr(start_agent(tmp_path))
    assert _state_rows(a) == {agent_audit.replica_of(a.proc.pid): 8}
    assert "audit record" not in _stderr(start_agent(tmp_path))  # and at every later start, nothing more
    assert _state_rows(a) == {agent_audit.replica_of(a.proc.pid): 8}


def test_mints_of_a_worker_killed_before_its_flush_are_stored_by_the_one_started_in_its_place(tmp_path: Path, org_key: OrgKey) -> None:
    a = start_agent(tmp_path, "--workers", "2")
    try:
        g = a.grant("--repo", REPO)
        env = sandbox_env(g["grant"], sock=a.socket)
        with _writes_held(a):
            for _ in range(16):
                mint(env)
            writers = [json.loads(ln)["replica"] for ln in a.audit_path.read_text().splitlines() if '"event":"mint"' in ln]
            dead = int(writers[-1].rpartition(":")[2])
            os.kill(dead, signal.SIGKILL)
        assert wait_for(lambda: sum(_state_rows(a).values()) == 16, timeout=15), _state_rows(a)
        err = _stderr(a)
    finally:
        a.stop()
    assert _state_rows(a) == dict(collections.Counter(writers))
    assert "added to the database" in err and "Traceback" not in err, err


def test_the_shared_server_helpers_import_without_pytest() -> None:
    # bench/run's venv has no pytest, and bench/fleet.py starts PostgreSQL with tests/realparts.py.
    import subprocess
    import sys

    code = "import sys; sys.modules['pytest'] = None; import tests.realparts as r; print(r.Postgres.__name__)"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0 and proc.stdout.strip() == "Postgres", proc.stderr


def test_an_audit_query_asks_the_replicas_in_turn_and_says_when_none_answered(agent: Agent, refused_port: int) -> None:
    # It asked only the first CODESTORE_AGENT_URL and, with that one down, read this
    # machine's files without a word: the answer depended on which replica was up.
    down = f"http://127.0.0.1:{refused_port}"
    alone = run_cli("codestore", "audit", env=dict(agent.env, CODESTORE_AGENT_URL=agent.url))
    second = run_cli("codestore", "audit", env=dict(agent.env, CODESTORE_AGENT_URL=f"{down},{agent.url}"))
    assert (second.returncode, second.stderr) == (alone.returncode, alone.stderr), (alone, second)  # the live replica's answer
    none = run_cli("codestore", "audit", env=dict(agent.env, CODESTORE_AGENT_URL=f"{down},{down}"))
    assert none.returncode == 0 and f"no agent at {down}, {down} answered; reading this machine's files only" in none.stderr, none


_SHORT_WRITE = r"""
import json, os, resource, signal, sys
from git_credential_codestore.agent import audit
log = audit.AuditLog(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not the signal's kill
log.record("mint", {"grant": "g1", "ttl": 1})
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 40, resource.RLIM_INFINITY))
errors = []
for n in (2, 3):
    try:
        log.record("mint", {"grant": f"g{n}", "ttl": n})
    except OSError as e:
        errors.append(e.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.record("mint", {"grant": "g4", "ttl": 4})
print(json.dumps({"errors": errors, "buffered": log.buffered}))
"""


def test_a_line_the_file_takes_only_in_part_is_an_error_and_does_not_swallow_the_next(tmp_path: Path) -> None:
    # A full disk (here: a real file-size limit, RLIMIT_FSIZE) takes part of a write and
    # says how much. Threat: the part ignored, the token handed out with a cut line as its
    # only record (the promise: every token handed out is in the audit log); and the next
    # line appended to the cut one, so that `recover` loses that record too. A line the
    # file did not take must not become a database row either (its token is refused).
    import subprocess
    import sys

    path = tmp_path / "audit.log"
    out = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(path)], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert len(seen["errors"]) == 2
    assert seen["errors"][0].startswith("only 40 of a line's ") and "the disk is full" in seen["errors"][0]
    assert seen["errors"][1] == os.strerror(errno.EFBIG)  # the file at its limit
    assert seen["buffered"] == 2  # g1 and g4: no row for a line the file did not take
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and len(lines[1].encode()) == 40
    assert [json.loads(lines[i])["grant"] for i in (0, 2)] == ["g1", "g4"]
    database = Database(str(tmp_path / "agent.sqlite3")).open()
    try:
        assert agent_audit.recover(database, str(path)) == 2
        with database.transaction(write=False) as tx:
            assert [r[0] for r in tx.execute("SELECT grant_id FROM audit ORDER BY id")] == ["g1", "g4"]
    finally:
        database.close()
