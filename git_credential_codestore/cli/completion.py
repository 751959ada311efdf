"""`codestore completion bash|zsh|fish`: print the shell completion script (click's own)."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL.

    \b
      bash:  eval "$(codestore completion bash)"   (in ~/.bashrc)
      zsh:   eval "$(codestore completion zsh)"    (in ~/.zshrc)
      fish:  codestore completion fish > ~/.config/fish/completions/codestore.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # every name in SHELLS is one click ships
    root = ctx.find_root().command
    click.echo(cls(root, {}, "codestore", "_CODESTORE_COMPLETE").source())
