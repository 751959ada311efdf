"""`codestore demo`: the whole flow offline (the work is in `git_credential_codestore.demo`)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory for inspection.")
def demo_cmd(keep: bool) -> None:
    """Run the whole flow offline against the embedded dev server."""
    from .. import demo

    demo.run(click.echo, keep=keep)
