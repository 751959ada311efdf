"""`codestore setup` and `codestore doctor`: configure git for the host, and check it all."""

from __future__ import annotations

import click

from ..errors import CodestoreError


@click.command("setup")
@click.option("--undo", is_flag=True, help="Remove exactly what setup added.")
@click.option("--system", is_flag=True, help="Write git's system config, for every user (image builds, as root).")
@click.option("--org", metavar="ORG", help="The org (default: $CODESTORE_ORG or the config file).")
@click.option("--base-url", metavar="URL", help="The Git base URL (default: $CODESTORE_BASE_URL, else https://ORG.code.storage).")
@click.pass_context
def setup_cmd(ctx: click.Context, undo: bool, system: bool, org: str | None, base_url: str | None) -> None:
    """Configure git to ask codestore for credentials for the Code Storage host(s).

    Every org configured here (the top level and each [orgs.NAME] section), or only the
    one --org (or `codestore --org NAME setup`) names. Needs no key and no network: with
    --system, run it while building an image.
    """
    import os

    from .. import config, setup

    env = dict(os.environ)
    if org:
        env["CODESTORE_ORG"] = org
    if base_url:
        env["CODESTORE_BASE_URL"] = base_url
    one = system or org or base_url or ctx.find_root().params.get("org")
    if undo and not one:
        # Everything setup did, as its record has it (an org set up with --org and
        # --base-url, say, that the config file does not name), and every configured org.
        recorded = setup.recorded(env)
        try:
            bases = [*recorded, *(cfg.base_url for cfg in config.all_orgs(env))]
        except CodestoreError:
            if not recorded:
                raise
            bases = recorded
        for base in dict.fromkeys(bases):
            removed = setup.undo_url(base, env)
            click.echo(f"restored {', '.join(removed)}" if removed else f"nothing to undo for {base}")
        return
    orgs = [config.load(env)] if one else config.all_orgs(env)
    for cfg in orgs:
        if system and not cfg.org:
            raise CodestoreError("setup --system writes the org into git's system config; pass --org ORG (or set CODESTORE_ORG)")
        where = "git's system config" if system else "git"
        if undo:
            removed = setup.undo_system(cfg) if system else setup.undo(cfg)
            click.echo(f"restored {', '.join(removed)}" if removed else f"nothing to undo for {cfg.base_url}")
            continue
        changed = setup.setup(cfg, system=system)
        click.echo(f"configured {where} for {cfg.base_url}: {', '.join(changed)}" if changed else f"{where} is already set up for {cfg.base_url}")
        others = [h for h in setup.effective_chain(cfg.base_url) if not setup.is_ours(h)]
        if others:
            click.echo(
                f"warning: git would still run {', '.join(repr(h) for h in others)} after codestore for {cfg.base_url} "
                "(a later credential.helper entry); it may store tokens: remove it or move it above codestore's entries",
                err=True,
            )


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {ok, checks: [{name, ok, warning, detail}]} (docs/json.md).")
@click.pass_context
def doctor_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check configuration, key, git, helper set-up and the server, for every org configured
    here (or the one `codestore --org NAME doctor` names); say what to fix."""
    from ..doctor import run_checks

    checks = run_checks(every_org=not ctx.find_root().params.get("org"))
    if as_json:
        from . import echo_json

        echo_json({"ok": all(c.ok for c in checks), "checks": [
            {"name": c.name, "ok": c.ok, "warning": c.warning, "detail": c.detail} for c in checks
        ]})
        if not all(c.ok for c in checks):
            raise click.exceptions.Exit(1)
        return
    for c in checks:
        mark = "ok  " if c.ok and not c.warning else ("warn" if c.ok else "FAIL")
        click.echo(f"{mark} {c.name}: {c.detail}")
    if not all(c.ok for c in checks):
        raise click.exceptions.Exit(1)
