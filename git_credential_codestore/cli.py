"""The `codestore` command line: set-up, keys, tokens, the dev server, the agent.

This is the only program that uses click; the git helpers stay lean. Each command is
a thin layer over a function in the module that owns the job, and every command runs
inside the one error boundary (`errors.boundary`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from . import __version__
from .errors import CodestoreError, boundary


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="codestore")
def cli() -> None:
    """Short-lived, least-privilege Code Storage credentials for plain git."""


# Commands are registered below, grouped by the module that owns them.
# (core: config, key, token, repo, setup, doctor, demo)


def _cfg():  # type: ignore[no-untyped-def]
    from . import config

    return config.load()


@cli.group("config")
def config_group() -> None:
    """Show or change settings (environment variables override the file)."""


@config_group.command("show")
def config_show() -> None:
    """Print the effective configuration (no secrets)."""
    cfg = _cfg()
    click.echo(f"file:     {cfg.path}")
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


@config_group.command("set")
@click.argument("key")
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Set KEY (org, base_url, api_url, kid, ttl, scopes, ephemeral_scopes, sub, private_key_file)."""
    from . import config

    if key == "private_key":
        raise CodestoreError("keys never go in the config file or argv; use: codestore key import FILE")
    click.echo(f"set {key} in {config.set_value(key, value)}")


@cli.group("key")
def key_group() -> None:
    """The org's private key: generate, import, show the public half."""


@key_group.command("generate")
@click.option("--type", "kind", type=click.Choice(["ec", "rsa", "ed25519"]), default="ec", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing stored key.")
def key_generate(kind: str, force: bool) -> None:
    """Make a new key and keep it in the OS keychain (or a 0600 file where there is none)."""
    from . import keys

    cfg = _cfg()
    if not force:
        try:
            _, where = keys.load_private_key(cfg)
        except CodestoreError:
            pass
        else:
            raise CodestoreError(f"a key already exists in {where}; pass --force to replace it")
    key = keys.generate(kind)
    where = keys.store_private_key(key, cfg)
    if where != "the OS keychain":
        click.echo(f"no OS keychain backend works here; stored in {where} (mode 0600)", err=True)
    click.echo(f"stored a new {kind} key in {where}; register its public half with Code Storage:")
    click.echo(keys.public_pem(key), nl=False)


@key_group.command("import")
@click.argument("source", default="-", metavar="[FILE|-]")
def key_import(source: str) -> None:
    """Store a PEM private key read from FILE or stdin (never from argv)."""
    from . import keys
    from .secrets import Secret

    if source == "-":
        pem = Secret(click.get_text_stream("stdin").read())
    else:
        try:
            with open(source, encoding="utf-8") as f:
                pem = Secret(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise CodestoreError(f"cannot read {source}: {getattr(e, 'strerror', e)}") from None
    key = keys.parse_private_key(pem, source if source != "-" else "stdin")
    where = keys.store_private_key(key, _cfg())
    click.echo(f"stored the key in {where}")


@key_group.command("public")
@click.option("--jwk", is_flag=True, help="Print a JWK instead of PEM.")
def key_public(jwk: bool) -> None:
    """Print the public key to register with Code Storage."""
    import json

    from . import keys

    cfg = _cfg()
    key, _ = keys.load_private_key(cfg)
    click.echo(json.dumps(keys.public_jwk(key, cfg.kid), indent=2) if jwk else keys.public_pem(key).rstrip())


@key_group.command("delete")
def key_delete() -> None:
    """Remove the stored key from the keychain and the fallback file."""
    from . import keys

    removed = keys.delete_stored_key(_cfg())
    click.echo(f"removed the key from {', '.join(removed)}" if removed else "no stored key to remove")


@cli.command("token")
@click.argument("repo")
@click.option("--scope", "scopes", multiple=True, help="A scope (repeatable); default: the configured scopes.")
@click.option("--ttl", type=int, help="Lifetime in seconds (default: configured, 300).")
@click.option("--ephemeral", is_flag=True, help="For the +ephemeral namespace.")
def token_cmd(repo: str, scopes: tuple[str, ...], ttl: int | None, ephemeral: bool) -> None:
    """Print one token for REPO (for scripts and REST calls)."""
    from .config import parse_scopes, parse_ttl, validate_repo_id
    from .source import TokenRequest, get_token

    cfg = _cfg()
    validate_repo_id(repo)
    wanted = parse_scopes(list(scopes), "--scope") if scopes else cfg.scopes_for(repo, ephemeral)
    token = get_token(TokenRequest(repo, wanted, ephemeral, parse_ttl(ttl, "--ttl") if ttl else None), cfg)
    click.echo(token.reveal())


@cli.group("repo")
def repo_group() -> None:
    """Repositories, through the REST API."""


@repo_group.command("create")
@click.argument("repo")
@click.option("--default-branch", default="main", show_default=True)
def repo_create(repo: str, default_branch: str) -> None:
    """Create REPO (a repo:write token for that id only)."""
    from . import api
    from .config import validate_repo_id
    from .source import TokenRequest, get_token

    cfg = _cfg()
    validate_repo_id(repo)
    token = get_token(TokenRequest(repo, ("repo:write",), ttl=60), cfg)
    api.create_repo(cfg.api_url, token, default_branch)
    click.echo(f"created {repo}: {cfg.repo_url(repo)}")


@repo_group.command("list")
def repo_list() -> None:
    """List the org's repositories (an org:read token)."""
    from . import api
    from .source import TokenRequest, get_token

    cfg = _cfg()
    token = get_token(TokenRequest("org", ("org:read",), ttl=60), cfg)
    for r in api.list_repos(cfg.api_url, token):
        click.echo(f"{r.get('repo_id')}\t{r.get('default_branch', '')}")


@cli.command("setup")
@click.option("--undo", is_flag=True, help="Remove exactly what setup added.")
def setup_cmd(undo: bool) -> None:
    """Configure git to ask codestore for credentials for the Code Storage host."""
    from . import setup

    cfg = _cfg()
    if undo:
        removed = setup.undo(cfg)
        click.echo(f"restored {', '.join(removed)}" if removed else f"nothing to undo for {cfg.base_url}")
        return
    changed = setup.setup(cfg)
    click.echo(f"configured git for {cfg.base_url}: {', '.join(changed)}" if changed else f"git is already set up for {cfg.base_url}")
    others = [h for h in setup.effective_chain(cfg.base_url) if h != setup.HELPER]
    if others:
        click.echo(
            f"warning: git would still run {', '.join(repr(h) for h in others)} after codestore for this host "
            "(a later credential.helper entry); it may store tokens: remove it or move it above codestore's entries",
            err=True,
        )


@cli.command("doctor")
def doctor_cmd() -> None:
    """Check configuration, key, git, helper set-up and the server; say what to fix."""
    from .doctor import run_checks

    checks = run_checks()
    for c in checks:
        mark = "ok  " if c.ok and not c.warning else ("warn" if c.ok else "FAIL")
        click.echo(f"{mark} {c.name}: {c.detail}")
    if not all(c.ok for c in checks):
        raise click.exceptions.Exit(1)


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory for inspection.")
def demo_cmd(keep: bool) -> None:
    """Run the whole flow offline against the embedded dev server."""
    from . import demo

    demo.run(click.echo, keep=keep)

# (dev server)
from .devserver.command import dev_server  # noqa: E402

cli.add_command(dev_server)
# (remote helper: clone, promote)
from remote_helper.commands import clone, promote  # noqa: E402

cli.add_command(clone)
cli.add_command(promote)
# (agent, grant)
from .agent.commands import agent, grant  # noqa: E402

cli.add_command(agent)
cli.add_command(grant)

from .agent.trust_commands import trust  # noqa: E402

cli.add_command(trust)


def main(argv: Sequence[str] | None = None) -> int:
    def run() -> int:
        try:
            # Without standalone mode click returns a command's exit code instead of exiting.
            result = cli.main(args=list(argv) if argv is not None else None, prog_name="codestore", standalone_mode=False)
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None
        except click.exceptions.ClickException as e:
            click.echo(f"codestore: {e.format_message()}", err=True)
            return e.exit_code
        except click.exceptions.Exit as e:
            return e.exit_code
        return result if isinstance(result, int) else 0

    return boundary("codestore", run)


if __name__ == "__main__":
    raise SystemExit(main())
