"""`codestore key ...`: the org's private key (generate, import, show the public half, delete)."""

from __future__ import annotations

import os
import sys

import click

from ..errors import CodestoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Config
    from ..tokens import PrivateKey


@click.group("key")
def key_group() -> None:
    """The org's private key: generate, import, show the public half."""


@key_group.command("generate")
@click.option("--type", "kind", type=click.Choice(["ec", "rsa", "ed25519"]), default="ec", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing stored key.")
@click.option("--pkcs11", "pkcs11_uri", metavar="URI",
              help="Make the key inside a PKCS#11 token (non-extractable), e.g. pkcs11:token=codestore;object=org-key.")
def key_generate(kind: str, force: bool, pkcs11_uri: str | None) -> None:
    """Make a new key and keep it in the OS keychain (or a 0600 file where there is none)."""
    import os

    from .. import config, keys

    if pkcs11_uri:
        from .. import hsm

        if kind == "ed25519":
            raise CodestoreError("a PKCS#11 key is --type ec or rsa")
        public = hsm.generate(pkcs11_uri, kind, os.environ)
        click.echo(f"made a non-extractable {kind} key in {hsm.parse_uri(pkcs11_uri, os.environ)}; register its public half with Code Storage:", err=True)
        click.echo(keys.public_pem(public), nl=False)
        return
    cfg = config.load()
    _refuse_if_overridden(cfg, "replace")
    _refuse_replacing(cfg, force)
    key = keys.generate(kind)
    where = keys.store_private_key(key, cfg)
    if where != "the OS keychain":
        click.echo(f"no OS keychain backend works here; stored in {where} (mode 0600)", err=True)
    click.echo(f"stored a new {kind} key in {where}; register its public half with Code Storage:")
    click.echo(keys.public_pem(key), nl=False)


def _refuse_if_overridden(cfg: Config, doing: str) -> None:
    """The stored key is never used while the environment names one (it takes precedence):
    changing the stored key then would say "done" and change nothing that signs."""
    from ..config import getenv

    if not cfg.uses_env:  # an [orgs.*] section: the environment's key is another org's
        return
    for var in ("CODESTORE_PRIVATE_KEY", "CODESTORE_PRIVATE_KEY_FILE"):
        if getenv(os.environ, var).strip():
            raise CodestoreError(f"{var} is set and names the key that signs, not the stored key this would {doing}; "
                                 f"unset {var} first (or change the key it names)")


def _refuse_replacing(cfg: Config, force: bool, new: PrivateKey | None = None) -> None:
    """A key already here is replaced only with --force (it may be the one Code Storage
    knows: replaced, every token is refused), unless `new` is that same key again."""
    from .. import keys

    if force:
        return
    try:
        old, where = keys.load_private_key(cfg)
    except CodestoreError:
        return
    if new is not None and keys.public_pem(old) == keys.public_pem(new):
        return
    raise CodestoreError(f"a key already exists in {where}; pass --force to replace it")


@key_group.command("import")
@click.argument("source", default="-", metavar="[FILE|-]")
@click.option("--force", is_flag=True, help="Replace a key that is already stored.")
def key_import(source: str, force: bool) -> None:
    """Store a PEM private key read from FILE or stdin (never from argv)."""
    from .. import config, keys
    from ..secrets import Secret

    if source == "-":
        from ..files import MAX_FILE

        pem = Secret(sys.stdin.read(MAX_FILE))  # click.get_text_stream is deprecated (click 9 drops it)
    else:
        from ..files import read_bounded

        try:
            pem = Secret(read_bounded(source, "the key file").decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise CodestoreError(f"cannot read {source}: {getattr(e, 'strerror', e)}") from None
    key = keys.parse_private_key(pem, source if source != "-" else "stdin")
    cfg = config.load()
    _refuse_if_overridden(cfg, "replace")
    _refuse_replacing(cfg, force, key)
    where = keys.store_private_key(key, cfg)
    click.echo(f"stored the key in {where}")


@key_group.command("public")
@click.option("--jwk", is_flag=True, help="Print a JWK instead of PEM.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {org, kid, alg, source, pem, jwk} (docs/json.md).")
def key_public(jwk: bool, as_json: bool) -> None:
    """Print the public key to register with Code Storage."""
    import json

    from .. import config, keys, tokens

    cfg = config.load()
    key, where = keys.load_private_key(cfg)
    if as_json:
        from . import echo_json

        echo_json({"org": cfg.org, "kid": cfg.kid, "alg": tokens.algorithm_for(key), "source": where,
                   "pem": keys.public_pem(key), "jwk": keys.public_jwk(key, cfg.kid)})
        return
    click.echo(json.dumps(keys.public_jwk(key, cfg.kid), indent=2) if jwk else keys.public_pem(key).rstrip())


@key_group.command("delete")
def key_delete() -> None:
    """Remove the stored key from the keychain and the fallback file."""
    from .. import config, keys

    cfg = config.load()
    _refuse_if_overridden(cfg, "remove")
    removed = keys.delete_stored_key(cfg)
    click.echo(f"removed the key from {', '.join(removed)}" if removed else "no stored key to remove")
