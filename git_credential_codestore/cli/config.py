"""`codestore config show|set`: the effective settings, and writing one into the file."""

from __future__ import annotations

import click

from .. import config as config_module
from ..errors import CodestoreError


@click.group("config")
def config_group() -> None:
    """Show or change settings (environment variables override the file)."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (field names in docs/json.md).")
def config_show(as_json: bool) -> None:
    """Print the effective configuration (no secrets)."""
    from .. import config

    cfg = config.load()
    others = [c for c in config.all_orgs() if c.name and c.name != cfg.name]
    if as_json:
        from . import echo_json

        echo_json({**config_json(cfg), "orgs": [config_json(c) for c in others]})
        return
    click.echo(f"file:     {cfg.path}{f' [orgs.{cfg.name}]' if cfg.name else ''}")
    for name, value in (
        ("org", cfg.org), ("base_url", cfg.base_url if cfg.org or cfg.base_url_setting else None),
        ("api_url", cfg.api_url if cfg.org or cfg.api_url_setting or cfg.base_url_setting else None),
        ("kid", cfg.kid), ("ttl", cfg.ttl), ("scopes", " ".join(cfg.scopes)),
        ("ephemeral_scopes", " ".join(cfg.ephemeral_scopes) if cfg.ephemeral_scopes else None),
        ("sub", cfg.sub),
    ):
        click.echo(f"{name + ':':<9} {value if value is not None else '(unset)'}")
    for rule in cfg.repos:
        click.echo(f"repos.{rule.pattern}: scopes={' '.join(rule.scopes or ()) or '-'} ephemeral_scopes={' '.join(rule.ephemeral_scopes or ()) or '-'}")
    for c in others:
        click.echo(f"[orgs.{c.name}] org {c.org}, git {c.base_url}, kid {c.kid or '(unset)'}, ttl {c.ttl}s, "
                   f"scopes {' '.join(c.scopes)} (codestore --org {c.name} config show)")


def config_json(cfg: config_module.Config) -> dict[str, object]:
    """The effective settings by their setting names; unset values are null."""
    served = bool(cfg.org or cfg.base_url_setting)
    return {
        "file": cfg.path,
        "section": cfg.name or None,
        "org": cfg.org,
        "base_url": cfg.base_url if served else None,
        "api_url": cfg.api_url if served else None,
        "kid": cfg.kid,
        "ttl": cfg.ttl,
        "scopes": list(cfg.scopes),
        "ephemeral_scopes": list(cfg.ephemeral_scopes) if cfg.ephemeral_scopes else None,
        "sub": cfg.sub,
        "private_key_file": cfg.private_key_file,
        "repos": [
            {"pattern": r.pattern, "scopes": list(r.scopes) if r.scopes else None,
             "ephemeral_scopes": list(r.ephemeral_scopes) if r.ephemeral_scopes else None}
            for r in cfg.repos
        ],
    }


@config_group.command("set")
@click.argument("key")
@click.argument("value")
@click.pass_context
def config_set(ctx: click.Context, key: str, value: str) -> None:
    """Set KEY (org, base_url, api_url, kid, ttl, scopes, ephemeral_scopes, sub, private_key_file).

    With `codestore --org NAME config set ...` the setting goes into the [orgs.NAME]
    section (created when missing), unless NAME is the top-level org.
    """
    from .. import config

    if key == "private_key":
        raise CodestoreError("keys never go in the config file or argv; use: codestore key import FILE")
    org = ctx.find_root().params.get("org")
    section = config.section_to_write(org) if org else None
    path = config.set_value(key, value, section=section)
    click.echo(f"set {key} in {path}{f' [orgs.{section}]' if section else ''}")
