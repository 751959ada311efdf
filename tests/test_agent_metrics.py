"""The agent's counters (agent/metrics.py): one slot per worker, summed for a scrape."""

from __future__ import annotations

import os

from git_credential_codestore.agent.metrics import REFUSALS, Metrics, Table


def parse(text: str) -> dict[str, float]:
    """Prometheus' text format to {name{labels}: value}; every sample line must parse."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def render(m: Metrics) -> dict[str, float]:
    return parse(m.render(gauges={}, labelled={}))


def test_a_scrape_sums_the_slots_of_workers_forked_after_the_table_was_made() -> None:
    table = Table(2)
    pid = os.fork()
    if pid == 0:  # a worker: counts in its own slot, in its own process
        code = 1
        try:
            child = Metrics(table, 1)
            for _ in range(3):
                child.observe(200, 0.002)
            child.observe(403, 0.0001)
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    mine = Metrics(table, 0)
    mine.observe(200, 0.3)
    m = render(mine)
    assert m["codestore_agent_tokens_minted_total"] == 4
    assert m['codestore_agent_tokens_refused_total{reason="beyond_grant"}'] == 1
    assert m["codestore_agent_token_seconds_count"] == 5
    assert m["codestore_agent_workers"] == 2


def test_a_worker_started_again_in_a_slot_continues_from_its_counts() -> None:
    # A replaced worker must not make the agent's counters go backwards.
    table = Table(2)
    first = Metrics(table, 1)
    for _ in range(5):
        first.observe(200, 0.001)
    first.signer_failed()
    first.publish(store_errors=4, audit_dropped=2, in_flight=3, audit_buffered=7, grant_reads=6)
    table.died(1)  # the parent, between the two workers
    again = Metrics(table, 1)
    again.observe(200, 0.001)
    again.publish(store_errors=1, audit_dropped=0, in_flight=0, audit_buffered=1, grant_reads=2)  # its parts count from 0
    m = render(Metrics(table, 0))
    assert m["codestore_agent_tokens_minted_total"] == 6
    assert m["codestore_agent_signer_errors_total"] == 1
    assert m["codestore_agent_store_errors_total"] == 5
    assert m["codestore_agent_audit_rows_dropped_total"] == 2
    assert m["codestore_agent_grant_reads_total"] == 8
    assert m["codestore_agent_requests_in_flight"] == 0
    assert m["codestore_agent_audit_rows_buffered"] == 1
    assert m["codestore_agent_worker_restarts_total"] == 1


def test_the_histogram_is_cumulative_with_prometheus_le_and_count_equal_to_inf() -> None:
    m = Metrics()
    for seconds in (0.0005, 0.0006, 0.004, 2.0):  # 0.0005 is on a bound: counted in le="0.0005"
        m.observe(200, seconds)
    h = render(m)
    assert h['codestore_agent_token_seconds_bucket{le="0.0005"}'] == 1
    assert h['codestore_agent_token_seconds_bucket{le="0.001"}'] == 2
    assert h['codestore_agent_token_seconds_bucket{le="0.005"}'] == 3
    assert h['codestore_agent_token_seconds_bucket{le="1.0"}'] == 3
    assert h['codestore_agent_token_seconds_bucket{le="+Inf"}'] == h["codestore_agent_token_seconds_count"] == 4
    assert abs(h["codestore_agent_token_seconds_sum"] - 2.0051) < 1e-6


def test_every_refusal_reason_is_exported_and_unknown_statuses_count_as_other() -> None:
    m = Metrics()
    for status in (401, 429, 418):
        m.observe(status, 0.001)
    r = render(m)
    assert {k for k in r if k.startswith("codestore_agent_tokens_refused_total")} == {
        f'codestore_agent_tokens_refused_total{{reason="{reason}"}}' for reason in REFUSALS}
    assert r['codestore_agent_tokens_refused_total{reason="unauthenticated"}'] == 1
    assert r['codestore_agent_tokens_refused_total{reason="rate_limited"}'] == 1
    assert r['codestore_agent_tokens_refused_total{reason="other"}'] == 1
    assert m.tokens() == (0, {reason: int(reason in ("unauthenticated", "rate_limited", "other")) for reason in REFUSALS})


def test_published_counts_of_each_worker_are_summed() -> None:
    table = Table(2)
    a, b = Metrics(table, 0), Metrics(table, 1)
    a.publish(store_errors=2, audit_dropped=0, in_flight=1, audit_buffered=10, grant_reads=0)
    b.publish(store_errors=1, audit_dropped=3, in_flight=4, audit_buffered=5, grant_reads=0)
    m = render(a)
    assert m["codestore_agent_store_errors_total"] == 3
    assert m["codestore_agent_audit_rows_dropped_total"] == 3
    assert m["codestore_agent_requests_in_flight"] == 5
    assert m["codestore_agent_audit_rows_buffered"] == 15
