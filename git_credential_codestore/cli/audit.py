"""`codestore audit`: query the audit trail (pushes, promotions, mints, grants).

The work is in `git_credential_codestore.audit`; this is its command line.
"""

from __future__ import annotations

import click

from ..audit import ALL_EVENTS
from ..errors import ConfigError


def _time(value: str | None, option: str) -> str | None:
    """A time filter checked as the command line is read: a bad one is a usage error (exit 2)."""
    if value is None:
        return None
    from ..audit import parse_time

    try:
        parse_time(value, option)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _text(value: str | None, option: str) -> str | None:
    """A text filter checked as the command line is read, as `_time` is."""
    if value is None:
        return None
    from ..audit import check_text

    try:
        return check_text(value, option)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


@click.command("audit")
@click.option("--repo", callback=lambda ctx, param, value: _text(value, "--repo"), help="Only this repository.")
@click.option("--ref", metavar="REF", help="Only pushes and promotions that touched this ref (feat means refs/heads/feat).")
@click.option("--grant", "grant_id", metavar="ID", callback=lambda ctx, param, value: _text(value, "--grant"), help="Only this grant id.")
@click.option("--sub", callback=lambda ctx, param, value: _text(value, "--sub"), help="Only this `sub` (who pushed or was minted for).")
@click.option("--event", type=click.Choice(ALL_EVENTS), help="Only this event.")
@click.option("--since", metavar="TIME", callback=lambda ctx, param, value: _time(value, "--since"),
              help="From this UTC time (2026-11-28T22:00:00Z, 2026-11-28) or age (30m, 2h, 7d).")
@click.option("--until", metavar="TIME", callback=lambda ctx, param, value: _time(value, "--until"), help="Up to this UTC time or age.")
@click.option("--limit", type=click.IntRange(1, 2000), default=200, show_default=True, help="At most this many (the newest).")
@click.option("--file", "files", multiple=True, metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="Also read this trail file (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for tools.")
def audit_cmd(repo: str | None, ref: str | None, grant_id: str | None, sub: str | None, event: str | None, since: str | None,
              until: str | None, limit: int, files: tuple[str, ...], as_json: bool) -> None:
    """Show the audit trail: who pushed what where, promotions, tokens minted and refused."""
    import json

    from .. import audit

    query = audit.Query(repo=repo, ref=ref, grant=grant_id, sub=sub, event=event, since=since, until=until)
    entries, sources = audit.collect(query, limit=limit, files=files)
    if as_json:
        for e in entries:
            click.echo(json.dumps(e, sort_keys=True))
        return
    if not entries:
        click.echo(f"no matching entries in: {', '.join(sources)}", err=True)
    for e in entries:
        click.echo(audit.describe(e))
