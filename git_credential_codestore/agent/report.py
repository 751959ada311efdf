"""The agent's audit endpoints: pushes reported by helpers, and queries of the trail.

    POST /v1/audit/report   owner, grant holder or workload identity: one push/promote
                            report (audit.validate_report). Who pushed is the agent's to
                            say: the grant id and `sub` come from the grant the caller
                            authenticated with (or the owner's configuration), never from
                            the report. A grant holder may report only for repositories
                            its grant covers, whatever the grant's state: a push made with
                            a token minted just before a revocation is still worth keeping.
                            A workload identity (`Authorization: Identity`, trust.py)
                            must verify and be admitted now by a trust policy covering
                            the repository; the `sub` is the one that policy mints under.
    POST /v1/audit/query    owner only: the `audit` table of the agent's database (every
                            replica's records; agent/audit.search) filtered by
                            audit.Query, newest last, at most `limit` entries (the
                            client reads 1 MiB at most); `before`, from a truncated
                            reply, pages to older entries.

Registered on the agent's router by server.py through ROUTES, ADMIN and HANDLERS.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import audit
from ..errors import ConfigError, Refused
from .audit import search
from .db import StoreError
from .policy import covers, is_sub

if TYPE_CHECKING:
    from .server import Agent, Caller

Reply = tuple[int, dict[str, object]]
MAX_QUERY = 2000
DEFAULT_QUERY = 1000

ROUTES = (
    ("POST", re.compile(r"/v1/audit/report"), "audit_report"),
    ("POST", re.compile(r"/v1/audit/query"), "audit_query"),
)
ADMIN = frozenset({"audit_query"})


def report(agent: Agent, caller: Caller, authorization: str | None, data: object) -> Reply:
    identity = agent.trust is not None and agent.trust.presented(authorization)
    grant, reason = None, None
    if not identity:
        try:
            grant, reason = agent._grant_for(caller, authorization)
        except StoreError as e:
            return 503, {"error": e.public, "code": "refused"}  # a sandbox's: not the database's address
    if reason is not None:
        return 401, {"error": reason, "code": "refused"}
    try:
        fields = audit.validate_report(data)
    except audit.BadReport as e:
        return 400, {"error": f"bad audit report: {e}"}
    who: dict[str, object]
    if identity and agent.trust is not None:
        # A workload that bought its token with an identity (trust.py) reports with it too.
        try:
            who = agent.trust.reporter(authorization or "", str(fields["repo"]))
        except Refused as e:
            return e.status, {"error": e.reason, "code": "refused"}
    elif grant is not None:
        if not covers(grant.repos, str(fields["repo"])):
            return 403, {"error": f"grant {grant.id} does not cover repository {fields['repo']!r}", "code": "refused"}
        who = {"grant": grant.id, "sub": grant.sub}
    else:
        sub = data.get("owner_sub") if isinstance(data, dict) else None
        who = {"grant": None, "sub": sub if is_sub(sub) else agent.cfg.sub}
    if isinstance(data, dict) and data.get("incomplete") is True:
        fields["incomplete"] = True
    event = str(fields.pop("event"))
    entry = {**who, "via": caller.transport, "peer": caller.peer, **fields}
    # Committed before the answer, not buffered like mints: pushes are few, every replica's
    # `codestore review` needs them at once, and a replica killed next must not lose one.
    write, after = agent.audit.in_transaction(event, entry)
    try:
        with agent.store.db.transaction() as tx:
            write(tx)
    except StoreError as e:
        try:
            agent.audit.record(event, entry)  # the file now, the database at the next flush
        except OSError as f:  # recorded nowhere: the reporter is told so, and may report again
            return 503, {"error": f"{e.public}; and the audit log cannot be written ({f.strerror}): "
                                  "the push is not recorded; report it again", "code": "refused"}
        return 201, {"ok": True, "event": event}
    warning = after()
    return 201, {"ok": True, "event": event, **({"warning": warning} if warning else {})}


def query(agent: Agent, caller: Caller, authorization: str | None, data: object) -> Reply:
    if not isinstance(data, dict):  # read as "no filters", it answered with the whole trail
        return 400, {"error": "an audit query is a JSON object of filters (docs/json.md)"}
    body = dict(data)
    limit = body.pop("limit", DEFAULT_QUERY)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_QUERY:
        return 400, {"error": f"limit must be 1..{MAX_QUERY}"}
    before = body.pop("before", None)
    if before is not None and (not isinstance(before, int) or isinstance(before, bool) or not 1 <= before < 1 << 63):
        return 400, {"error": "before must be a cursor from an earlier reply (a positive integer)"}
    try:
        q = audit.Query.from_json(body)
    except ConfigError as e:
        return 400, {"error": str(e)}
    try:
        # This replica's buffered mints and reports first, so its caller sees them too;
        # other replicas' rows are at most their flush interval behind.
        agent.store.flush()
        entries, more = search(agent.store.db, q, limit, before)
    except StoreError as e:
        return 503, {"error": f"cannot read the audit trail: {e}; try again, or read this replica's file {agent.audit.path}"}
    return 200, {"entries": entries, "truncated": more is not None, "before": more, "trail": f"database {agent.store.where}"}


HANDLERS: dict[str, Callable[[Agent, Caller, str | None, object], Reply]] = {
    "audit_report": report,
    "audit_query": query,
}
