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
# (dev server)
# (remote helper: clone, promote)
# (agent, grant)


def main(argv: Sequence[str] | None = None) -> int:
    def run() -> int:
        try:
            cli.main(args=list(argv) if argv is not None else None, prog_name="codestore", standalone_mode=False)
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None
        except click.exceptions.ClickException as e:
            click.echo(f"codestore: {e.format_message()}", err=True)
            return e.exit_code
        except click.exceptions.Exit as e:
            return e.exit_code
        return 0

    return boundary("codestore", run)


if __name__ == "__main__":
    raise SystemExit(main())
