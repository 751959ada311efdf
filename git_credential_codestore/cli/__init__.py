"""The `codestore` command line: one module per command group, as pre-commit does.

This package is the only place that imports click; the git helpers and the core stay
lean and click-free. Each command is a thin layer over a function in the core module
that owns the job, and every command runs inside the one error boundary
(`errors.boundary`).

    config.py      codestore config show|set
    key.py         codestore key generate|import|public|delete
    token.py       codestore token
    repo.py        codestore repo create|list|delete
    branch.py      codestore branch list|delete (both namespaces)
    ephemeral.py   codestore clone|promote (the +ephemeral namespace)
    review.py      codestore review (what a sandbox pushed, before promotion)
    audit.py       codestore audit (the audit trail)
    setup.py       codestore setup|doctor
    demo.py        codestore demo
    dev_server.py  codestore dev-server
    agent.py       codestore agent serve|start|stop|status
    grant.py       codestore grant create|revoke|list
    completion.py  codestore completion bash|zsh|fish
    trust.py       codestore trust add|list|remove (workload identities)

A new command: a module here with a click command calling into the core, and one
`cli.add_command` line below.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from .. import __version__
from ..errors import boundary
from . import (
    agent,
    audit,
    branch,
    completion,
    config,
    demo,
    dev_server,
    ephemeral,
    grant,
    key,
    repo,
    review,
    setup,
    token,
    trust,
)

EXIT_CODES = """\b
Exit codes (codestore and git-remote-codestore):
  0    success
  1    an expected failure, said in one line (configuration, key, policy, server)
  2    a command line that cannot run as given (usage)
  3    a bug: one line here, the redacted traceback in the crash log
  130  interrupted (Ctrl-C)
git-credential-codestore answers quit=1 and exits 0 on an expected failure (git acts
on quit=1 alone), 2 on usage and 3 on a bug.
Tracing: CODESTORE_TRACE=1 (stderr) or =/absolute/file; never shows a secret.
Completion: codestore completion bash|zsh|fish."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="codestore")
@click.option("--org", "org", metavar="NAME", help="Act for this org: an [orgs.NAME] section of the config file, "
              "or the org's name (same as CODESTORE_ORG=NAME).")
def cli(org: str | None) -> None:
    """Short-lived, least-privilege Code Storage credentials for plain git."""
    if org:
        import os

        from ..vocab import is_org

        if not is_org(org):  # a command-line value: a usage error, as click's own (exit 2)
            raise click.BadParameter(f"{org[:64]!r} is not an org name (a DNS label: letters, digits and '-')", param_hint="--org")
        # One way to choose an org, whoever reads the configuration (and the agent this starts).
        os.environ["CODESTORE_ORG"] = org


for command in (
    config.config_group,
    key.key_group,
    token.token_cmd,
    repo.repo_group,
    setup.setup_cmd,
    setup.doctor_cmd,
    demo.demo_cmd,
    dev_server.dev_server,
    ephemeral.clone,
    ephemeral.promote,
    review.review_cmd,
    audit.audit_cmd,
    branch.branch_group,
    agent.agent,
    grant.grant,
    completion.completion,
    trust.trust,
):
    cli.add_command(command)


class Given(click.ParamType):
    """An option's text or path type, refusing an empty value. `--expires-in "$TTL"` with TTL
    unset was taken as the option left out: a grant without an end, a listing without its
    filter. Wrapped around every such option of every command (`_require_values`), so a new
    option is covered without being named."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a value, or leave the option out (is the variable holding it unset?)", param, ctx)
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.inner.get_metavar(param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[click.shell_completion.CompletionItem]:
        return self.inner.shell_complete(ctx, param, incomplete)


def _require_values(command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag and isinstance(param.type, (click.types.StringParamType, click.Path)):
            param.type = Given(param.type)
    for sub in getattr(command, "commands", {}).values():
        _require_values(sub)


_require_values(cli)


def echo_json(value: object) -> None:
    """The one way a command prints machine-readable state (`--json`): one JSON document.

    Field names are a contract (docs/json.md): fields may be added, never renamed or removed.
    """
    import json

    click.echo(json.dumps(value, indent=2))


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
