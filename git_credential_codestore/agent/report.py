"""The agent's audit endpoints: pushes reported by helpers, and queries of the trail.

    POST /v1/audit/report   owner or grant holder: one push/promote report
                            (audit.validate_report). Who pushed is the agent's to say:
                            the grant id and `sub` come from the grant the caller
                            authenticated with (or the owner's configuration), never from
                            the report. A grant holder may report only for repositories
                            its grant covers, whatever the grant's state: a push made with
                            a token minted just before a revocation is still worth keeping.
    POST /v1/audit/query    owner only: the trail filtered by audit.Query, newest last,
                            at most `limit` entries (the client reads 1 MiB at most).

Registered on the agent's router by server.py through ROUTES, ADMIN and HANDLERS.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import audit
from ..errors import ConfigError

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
    grant, reason = agent._grant_for(caller, authorization)
    if reason is not None:
        return 401, {"error": reason, "code": "refused"}
    try:
        fields = audit.validate_report(data)
    except audit.BadReport as e:
        return 400, {"error": f"bad audit report: {e}"}
    if grant is not None:
        if not any(fnmatch.fnmatchcase(str(fields["repo"]), p) for p in grant.repos):
            return 403, {"error": f"grant {grant.id} does not cover repository {fields['repo']!r}", "code": "refused"}
        who: dict[str, object] = {"grant": grant.id, "sub": grant.sub}
    else:
        sub = data.get("owner_sub") if isinstance(data, dict) else None
        who = {"grant": None, "sub": sub if isinstance(sub, str) and 0 < len(sub) <= 200 else agent.cfg.sub}
    if isinstance(data, dict) and data.get("incomplete") is True:
        fields["incomplete"] = True
    event = str(fields.pop("event"))
    agent.audit.record(event, {**who, "via": caller.transport, "peer": caller.peer, **fields})
    return 201, {"ok": True, "event": event}


def query(agent: Agent, caller: Caller, authorization: str | None, data: object) -> Reply:
    body = dict(data) if isinstance(data, dict) else {}
    limit = body.pop("limit", DEFAULT_QUERY)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_QUERY:
        return 400, {"error": f"limit must be 1..{MAX_QUERY}"}
    try:
        q = audit.Query.from_json(body)
    except ConfigError as e:
        return 400, {"error": str(e)}
    entries = q.select(audit.read(agent.audit.path))
    return 200, {"entries": entries[-limit:], "truncated": len(entries) > limit, "trail": agent.audit.path}


HANDLERS: dict[str, Callable[[Agent, Caller, str | None, object], Reply]] = {
    "audit_report": report,
    "audit_query": query,
}
