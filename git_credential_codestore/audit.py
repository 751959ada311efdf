"""The audit trail of pushes and promotions: its record shape, where it lives, how to query it.

The agent's audit log (agent/audit.py) already holds one JSON line per token minted or
refused. This module adds what a token cannot say: what a push *changed*. The remote
helper sees git's push commands and the transport's per-ref answers, and reports them
as a `push` event; `codestore promote` reports a `promote` event. Where they go:

    through the agent   POST /v1/audit/report (agent/report.py): the agent stamps who
                        pushed (grant id and `sub`, or the workload's trust policy)
                        from its own records, never from the report, and commits the
                        event to the `audit` table of its database (shared by its
                        replicas), then appends it to its log file. Queries
                        (POST /v1/audit/query) read that table.
    with a local key    a JSON-lines file of the same shape, CODESTORE_AUDIT_LOG or
                        <user state dir>/codestore/audit.log.

What the trail can and cannot prove: refs and results are *reported by the pusher's
helper*. A sandbox that uses a token by hand, or kills the helper, pushes without a
report; the agent's `mint` line (a write token went to grant X at time T) still says a
push was possible. `codestore review` therefore checks what it reviews against the
server itself, and flags a branch head that no audited push explains. The credential
helper cannot report at all: git's credential protocol never tells it what is pushed.

`validate_report` is the one check of a report's shape, used by the agent for reports
from sandboxes and by the helper before writing its local file.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import jsontext
from .errors import ConfigError, redact
from .files import open_nonblocking
from .lines import has_control, has_surrogate

EVENTS = ("push", "promote")
# Every event a trail holds: the reports above, then the agent's (agent/server.py, agent/trust.py).
ALL_EVENTS = (*EVENTS, "mint", "refuse", "grant-create", "grant-revoke", "trust-add", "trust-remove")
RESULTS = ("ok", "error", "unknown")
MAX_REFS = 1000
ZERO = "0" * 40
_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# git check-ref-format, the parts that matter for a log: no controls, spaces or `..`.
_REF = re.compile(r"^refs/[A-Za-z0-9._/+@-]{1,250}$")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class BadReport(ValueError):
    """A report that is not well formed; the text names the field, never a long value."""


def is_sha(value: object) -> bool:
    """A full object id (SHA-1 or SHA-256), lower-case hex: the only form the trail holds."""
    return isinstance(value, str) and bool(_SHA.match(value))


def _sha(value: object, where: str) -> str:
    if not isinstance(value, str) or not is_sha(value):
        raise BadReport(f"{where} must be a full hex object id")
    return value


def validate_report(data: object) -> dict[str, object]:
    """The fields of a push/promote report, checked and copied (nothing else passes)."""
    if not isinstance(data, dict):
        raise BadReport("a report must be a JSON object")
    event = data.get("event")
    if event not in EVENTS:
        raise BadReport(f"event must be one of {', '.join(EVENTS)}")
    repo = data.get("repo")
    if not isinstance(repo, str):
        raise BadReport("repo is required")
    from .vocab import validate_repo_id

    try:
        validate_repo_id(repo)
    except ConfigError:
        raise BadReport("repo is not a repository id") from None
    ephemeral = data.get("ephemeral", False)
    if not isinstance(ephemeral, bool):
        raise BadReport("ephemeral must be true or false")
    refs = data.get("refs")
    if not isinstance(refs, list) or not 1 <= len(refs) <= MAX_REFS:
        raise BadReport(f"refs must be a list of 1..{MAX_REFS} ref updates")
    out_refs = []
    for n, r in enumerate(refs):
        if not isinstance(r, dict):
            raise BadReport(f"refs[{n}] must be an object")
        ref = r.get("ref")
        if not isinstance(ref, str) or not _REF.match(ref) or ".." in ref:
            raise BadReport(f"refs[{n}].ref is not a ref name")
        result = r.get("result")
        if result not in RESULTS:
            raise BadReport(f"refs[{n}].result must be one of {', '.join(RESULTS)}")
        entry: dict[str, object] = {
            "ref": ref,
            "old": _sha(r.get("old", ZERO), f"refs[{n}].old"),
            "new": _sha(r.get("new"), f"refs[{n}].new"),
            "forced": bool(r.get("forced", False)),
            "result": result,
        }
        reason = r.get("reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise BadReport(f"refs[{n}].reason must be text")
            entry["reason"] = redact(" ".join(reason.split()))[:200]
        out_refs.append(entry)
    fields: dict[str, object] = {"repo": repo, "ephemeral": ephemeral, "refs": out_refs}
    if event == "promote":
        for key in ("branch", "target"):
            v = data.get(key)
            if not isinstance(v, str) or not _REF.match("refs/heads/" + v):
                raise BadReport(f"{key} is not a branch name")
            fields[key] = v
        fields["expect_sha"] = _sha(data.get("expect_sha"), "expect_sha") if data.get("expect_sha") else None
    fields["result"] = summarize(out_refs)
    return {"event": event, **fields}


def summarize(refs: Iterable[Mapping[str, object]]) -> str:
    """One word for a whole push: ok (every ref taken), error (none), partial, unknown."""
    results = {r.get("result") for r in refs}
    if results == {"ok"}:
        return "ok"
    if results == {"error"}:
        return "error"
    if "unknown" in results and not results & {"ok", "error"}:
        return "unknown"
    return "partial"


# -- where the local trail lives --------------------------------------------------------


def local_trail(env: Mapping[str, str] | None = None) -> str:
    """The file pushes with a local key are recorded in."""
    env = os.environ if env is None else env
    if env.get("CODESTORE_AUDIT_LOG"):
        return os.path.expanduser(env["CODESTORE_AUDIT_LOG"])
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("codestore"), "audit.log")


def agent_trail() -> str:
    """The audit log of an agent started with default settings (read when it is not running)."""
    from .agent.server import default_state_dir

    return os.path.join(default_state_dir(), "audit.log")


def append_local(path: str, fields: Mapping[str, object]) -> None:
    """Append one checked event to a local trail, in the agent's own line format."""
    from .agent.audit import AuditLog

    event = str(fields["event"])
    log = AuditLog(path)
    try:
        log.record(event, {k: v for k, v in fields.items() if k != "event"})
    finally:
        log.close()


# -- reading and querying ---------------------------------------------------------------


def read(path: str) -> Iterator[dict[str, Any]]:
    """Entries of one JSON-lines trail; a missing file is empty, a torn or undecodable line is skipped."""
    import stat

    try:
        fd = open_nonblocking(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"cannot read the audit trail {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)  # a pipe or a device (/dev/zero) never ends: a trail is a file
        raise ConfigError(f"the audit trail {path} is not a regular file; point it at the trail's file")
    with open(fd, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = jsontext.loads(line)
            except ValueError:
                continue  # a line cut short by a crash; the rest is still the record
            if isinstance(entry, dict):
                yield entry


def parse_time(value: str, option: str) -> str:
    """An ISO-8601 UTC instant (date, or date and time) or a relative age like 2h, 3d."""
    value = value.strip()
    m = re.fullmatch(r"(\d{1,18})([smhd])", value)
    if m:
        # An age beyond 1970 is the whole trail, not a year before 0 (or past what gmtime takes).
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.strftime(TIME_FORMAT, time.gmtime(max(0, int(time.time()) - seconds)))
    for fmt in (TIME_FORMAT, "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return time.strftime(TIME_FORMAT, time.strptime(value, fmt))
        except ValueError:
            continue
    raise ConfigError(f"{option} takes a UTC time like 2026-11-28T22:00:00Z or 2026-11-28, or an age like 30m, 2h, 7d; not {value[:40]!r}")


def check_text(value: str, option: str) -> str:
    """A filter's value, unless it holds what no entry can (a control character; a lone
    surrogate, which no database driver can encode): that is bad input, said so, not a
    database failure (PostgreSQL refuses a NUL: "try again") or an internal error."""
    if has_control(value) or has_surrogate(value):
        raise ConfigError(f"{option} takes text without control characters or unpaired surrogates, not {value[:40]!r}")
    return value


class Query:
    """Which entries to keep: every given field must match (times compare as UTC text).

    `ref` keeps pushes and promotions that touched that ref (a short name means a
    branch: `feat` is `refs/heads/feat`). `since`/`until` are normalised by parse_time,
    so a database can compare them as numbers (agent/audit.py) and a file as text.
    """

    FIELDS = ("repo", "ref", "grant", "sub", "event", "since", "until")

    def __init__(self, **criteria: str | None) -> None:
        unknown = set(criteria) - set(self.FIELDS)
        if unknown:
            raise ConfigError(f"unknown audit filter {sorted(unknown)[0]!r}")
        self.criteria = {k: v for k, v in criteria.items() if v}
        for key, value in self.criteria.items():
            check_text(value, f"--{key}")
        for key in ("since", "until"):
            if key in self.criteria:
                self.criteria[key] = parse_time(self.criteria[key], f"--{key}")
        if "ref" in self.criteria:
            ref = self.criteria["ref"]
            ref = ref if ref.startswith("refs/") else "refs/heads/" + ref
            if not _REF.match(ref) or ".." in ref:
                raise ConfigError(f"--ref takes a ref name like feat or refs/heads/feat, not {ref[:60]!r}")
            self.criteria["ref"] = ref

    @classmethod
    def from_json(cls, data: object) -> Query:
        if not isinstance(data, dict) or not all(k in cls.FIELDS and (v is None or isinstance(v, str)) for k, v in data.items()):
            raise ConfigError(f"an audit query is an object with string fields among {', '.join(cls.FIELDS)}")
        return cls(**data)

    def to_json(self) -> dict[str, str]:
        return dict(self.criteria)

    def matches(self, entry: Mapping[str, object]) -> bool:
        c = self.criteria
        for key in ("repo", "grant", "sub", "event"):
            if key in c and entry.get(key) != c[key]:
                return False
        if "ref" in c:
            refs = entry.get("refs")
            if entry.get("event") not in EVENTS or not isinstance(refs, list):
                return False
            if not any(isinstance(r, dict) and r.get("ref") == c["ref"] for r in refs):
                return False
        when = str(entry.get("time", ""))
        if "since" in c and when < c["since"]:
            return False
        if "until" in c and when > c["until"]:
            return False
        return True

    def select(self, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if self.matches(e)]


def merge(*trails: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several trails as one, oldest first (stable: file order breaks ties within a second)."""
    entries = [e for trail in trails for e in trail]
    return sorted(entries, key=lambda e: str(e.get("time", "")))


def pushes_to(entries: Iterable[Mapping[str, Any]], repo: str, ref: str, ephemeral: bool) -> list[dict[str, Any]]:
    """Every reported update of one ref, oldest first: {time, grant, sub, old, new, result, event}."""
    out = []
    for e in entries:
        if e.get("event") not in EVENTS or e.get("repo") != repo or bool(e.get("ephemeral")) != ephemeral:
            continue
        for r in e.get("refs") or ():
            if isinstance(r, dict) and r.get("ref") == ref:
                out.append({
                    "time": e.get("time"), "event": e.get("event"), "grant": e.get("grant"), "sub": e.get("sub"),
                    "via": e.get("via"), "old": r.get("old"), "new": r.get("new"), "forced": r.get("forced", False),
                    "result": r.get("result"), "reason": r.get("reason"),
                })
    return out


# -- the whole trail, as the owner sees it ------------------------------------------------


def collect(query: Query, env: Mapping[str, str] | None = None, *, limit: int = 1000,
            files: Iterable[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Entries matching `query` from every trail this user owns, oldest first, and where from.

    The agent's trail through the agent when it answers (its database: every
    replica's records), else its default file; the local trail of pushes made with a local key; and any
    `files` given. A sandbox (holding a grant) is refused by the agent: only the owner
    reads the trail.
    """
    from .agent.client import AgentUnavailable, call_any, refusal
    from .agent.discovery import AGENT_URL, Endpoint, endpoints_from_env, read_grant
    from .errors import RemoteError

    env = os.environ if env is None else env
    trails: list[list[dict[str, Any]]] = []
    sources: list[str] = []
    # Whichever replica answers (every replica's records are in the database): the next
    # is asked when one is down, silent or cannot read its store, as the helpers do.
    endpoints = endpoints_from_env(env)
    grant = read_grant(env)

    def ask(limit: int, before: int | None = None) -> tuple[Endpoint, int, dict[str, object]]:
        return call_any(endpoints, "POST", "/v1/audit/query", {**query.to_json(), "limit": limit,
                                                               **({"before": before} if before is not None else {})},
                        grant=grant, env=env)

    try:
        ep, status, reply = ask(limit)
    except AgentUnavailable:
        ep, status, reply = endpoints[0], 0, {}
    if status == 0 and env.get(AGENT_URL, "").strip():
        import sys

        # Named, yet none answered: what follows is only this machine's files, not the fleet's trail.
        print(f"codestore: warning: no agent at {', '.join(map(str, endpoints))} answered; reading this machine's files only",
              file=sys.stderr)
    if status == 200:
        found = _entries(reply)
        # A reply stops after the rows the agent may read for one (MAX_SCAN), with a cursor
        # to the older rows: followed until `limit` entries are found or the trail ends. An
        # answer of "no entries" there would be wrong, not short: older rows may match.
        cursor = reply.get("before")
        while reply.get("truncated") is True and len(found) < limit:
            if not isinstance(cursor, int) or isinstance(cursor, bool) or cursor <= 0:
                raise RemoteError(f"the codestore agent at {ep} cut its audit reply short without a cursor to the rest; "
                                  "is it a codestore agent of this version?")
            ep, status, reply = ask(limit - len(found), cursor)
            if status != 200:
                raise refusal(ep, status, reply)
            found[:0] = _entries(reply)
            following = reply.get("before")
            if isinstance(following, int) and following >= cursor:  # never the same rows twice, never endlessly
                raise RemoteError(f"the codestore agent at {ep} sent a cursor that does not go back; is it a codestore agent of this version?")
            cursor = following
        trails.append(found)
        sources.append(f"agent {ep} ({reply.get('trail')})")
    elif status:
        raise refusal(ep, status, reply)
    else:
        path = agent_trail()
        trails.append(query.select(read(path)))
        sources.append(path)
    paths = [local_trail(env), *files]
    for path in paths:
        trails.append(query.select(read(path)))
        sources.append(path)
    return merge(*trails)[-limit:], sources


def _entries(reply: Mapping[str, object]) -> list[dict[str, Any]]:
    entries = reply.get("entries")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def describe(e: Mapping[str, Any]) -> str:
    """One line per entry for people (what a terminal would act on, escaped: errors.for_terminal)."""
    from .errors import for_terminal

    return for_terminal(_describe(e))


def _describe(e: Mapping[str, Any]) -> str:
    who = f"grant {e['grant']} ({e.get('sub')})" if e.get("grant") else str(e.get("sub") or e.get("peer") or "owner")
    where = f"{e.get('repo', '-')}{'+ephemeral' if e.get('ephemeral') else ''}"
    head = f"{e.get('time', '?')}  {str(e.get('event', '?')):<12} {where:<30} {who}"
    if e.get("event") in EVENTS:
        refs = "; ".join(
            f"{str(r.get('ref', '')).removeprefix('refs/heads/')} {str(r.get('old', ''))[:10]}->{str(r.get('new', ''))[:10]} {r.get('result')}"
            + (f" ({r['reason']})" if r.get("reason") else "")
            for r in e.get("refs") or () if isinstance(r, dict)
        )
        extra = f"  from {e['branch']}" if e.get("event") == "promote" and e.get("branch") else ""
        return f"{head}  {refs}{extra}"
    if e.get("event") == "mint":
        return f"{head}  {' '.join(e.get('scopes') or ())} ttl={e.get('ttl')} ({e.get('purpose')})"
    if e.get("reason"):
        return f"{head}  {e['reason']}"
    return head
