"""git-remote-codestore: `codestore://org/repo` remotes with per-operation least privilege.

git runs `git-remote-codestore <remote> <url>` for every fetch, push, clone and ls-remote.
We answer the protocol's preamble ourselves; the first real command says whether this
process reads or pushes, and only then is a token minted: `git:read` for a read,
`git:read git:write` for a push. Who decides whether that is allowed: local configuration
(scopes for that repository and namespace), unless the environment names the agent
(discovery.agent_named), which then decides by who asks. git's own `git remote-https`
then does the transfer with the token in its environment alone (see transport.py).

Startup is paid by every git operation: this module is on the helpers' fast path
(git_credential_codestore/fastpath.py names it and what it must not import).
"""

from __future__ import annotations

import io
import os
import sys

from git_credential_codestore import config, remotes
from git_credential_codestore.agent.discovery import agent_named
from git_credential_codestore.errors import CodestoreError, PolicyError, UsageError, boundary
from git_credential_codestore.source import choose_source
from git_credential_codestore.trace import say
from git_credential_codestore.vocab import TokenRequest, with_implied

from . import protocol, transport

TYPE_CHECKING = False  # typing is a cost on every git operation
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import BinaryIO

    from git_credential_codestore.source import TokenSource

    from . import pushwatch  # imported for pushes only: it brings the audit module

    Launcher = Callable[[Sequence[str], Mapping[str, str], Sequence[int]], transport.Child]

PROG = "codestore"
# What each operation needs, at most (git:write includes read, so a push token carries both).
READ_NEEDS = ("git:read",)
PUSH_NEEDS = ("git:write",)


def request_for(operation: str, remote: remotes.Remote, cfg: config.Config, by_agent: bool = False) -> TokenRequest:
    """The least privilege for the operation, if configuration allows it at all.

    When the environment names the agent (`by_agent`), the agent is the policy: it is
    asked for at most what the operation needs and narrows that by who is asking (a
    grant's terms, or the owner's configuration), refusing with its reason. Otherwise
    local configuration decides here, before any token exists.
    """
    needs = PUSH_NEEDS if operation == "push" else READ_NEEDS
    if by_agent:
        return TokenRequest(remote.repo, needs, remote.ephemeral, purpose="remote", narrow=True)
    return TokenRequest(remote.repo, cfg.narrow(remote.repo, remote.ephemeral, needs), remote.ephemeral, purpose="remote")


def _resolver(env: Mapping[str, str]) -> Callable[[str], str | None]:
    """The object a push's source names in the local repository (git gives a ref name)."""

    def resolve(src: str) -> str | None:
        import subprocess  # pushes only: subprocess is not on the fast path

        try:
            proc = subprocess.run(
                ["git", "rev-parse", "--verify", "--quiet", src], env=dict(env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        except OSError:
            return None
        out = proc.stdout.decode("ascii", "replace").strip()
        return out if proc.returncode == 0 and out else None

    return resolve


def _record_push(source: TokenSource, remote: remotes.Remote, watch: pushwatch.PushWatch, git_err: transport.Endpoint) -> None:
    """Put what the push changed in the audit trail; a failure to do so is a warning, not
    a failed push (the server has already taken it)."""
    from git_credential_codestore.audit import MAX_REFS, BadReport, validate_report

    try:
        refs = watch.report()
        # A push of more refs than one report holds is recorded in several, MAX_REFS each: a
        # sandbox pushing 1000 decoy refs with the one that matters kept it out of the trail.
        for at in range(0, len(refs), MAX_REFS):
            source.record(validate_report({"event": "push", "repo": remote.repo, "ephemeral": remote.ephemeral,
                                           "refs": refs[at:at + MAX_REFS]}))
    except (CodestoreError, BadReport) as e:
        try:
            git_err.write(f"codestore: warning: this push is not in the audit trail: {e}\n".encode())
        except OSError:
            pass


def run(
    argv: Sequence[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: BinaryIO | None = None,
    env: Mapping[str, str] | None = None,
    launch: Launcher | None = None,
) -> int:
    """One remote-helper session over git's streams; returns the exit status for git."""
    env = os.environ if env is None else env
    git_in = transport.Endpoint(stdin)
    git_out = transport.Endpoint(stdout)
    git_err = transport.Endpoint(stderr if stderr is not None else sys.stderr.buffer)

    def session() -> int:
        if list(argv) == ["--version"]:
            from git_credential_codestore import __version__

            git_out.write(f"git-remote-codestore {__version__}\n".encode())
            return 0
        if len(argv) != 2:
            raise UsageError(
                "usage: git-remote-codestore <remote> <url> (or --version); git runs it for codestore:// remotes, "
                "e.g. git clone codestore://<org>/<repo>"
            )
        remote_name, url = argv
        remote, cfg = remotes.parse(url, remotes.config_for(url, env))
        reader = protocol.LineReader(git_in.read)
        decision = protocol.negotiate(reader, git_out.write)
        if decision.operation == "end":
            return 0
        say("remote", f"{remote_name} {url}: git wants to {decision.operation}", env)
        if decision.command.startswith(b"get "):
            # `get URI PATH` downloads URI with the transport, which sends the token with every
            # request it makes (git matches http.<url>.extraHeader once, against the remote's
            # URL): a URI elsewhere (a bundle server) would get the token.
            uri = decision.command[4:].rsplit(b" ", 1)[0].decode("utf-8", "replace")
            if not uri.startswith(remote.https_url.rstrip("/") + "/"):
                raise PolicyError("git asked to download a file from outside the repository's URL (a bundle URI?); "
                                  "codestore sends its token only to the repository's own server: fetch without bundle URIs")
        # The environment's agent speaks for the env-configured org only.
        request = request_for(decision.operation, remote, cfg, cfg.uses_env and agent_named(env))
        scopes = " ".join(with_implied(request.scopes))
        say("remote", f"asking for {remote.repo} in {remote.namespace}: {scopes}"
            f"{' at most (the agent decides)' if request.narrow else ''}", env)
        # git passes the URL itself as the remote name for a URL given on the command line.
        name = remote.https_url if remote_name == url else remote_name
        fields = {
            "repo": remote.repo,
            "org": cfg.org or "(unset)",
            "kid": cfg.kid or "(none)",
            "scopes": scopes,
            "base": remote.base_url,
        }

        used: list[TokenSource] = []  # the source of each token (the push's takes its report)

        def transfer(
            decision: protocol.Decision,
            advertisement_only: bool = False,
            advertised: Callable[[bytes], None] | None = None,
            results: Callable[[protocol.LineReader, Callable[[bytes], None]], None] | None = None,
        ) -> int:
            """One transport process, with a token minted now, for this one step."""
            source = choose_source(cfg, env)
            token = source.mint(request)
            used.append(source)
            expires_at = token.expires_at
            private = transport.PrivateConfig(transport.token_config(token, remote.https_url, name))
            del token
            try:
                child = (launch or transport.spawn)(
                    transport.transport_argv(name, remote.https_url, env), transport.child_env(env, private), private.pass_fds
                )
                return transport.proxy(
                    child, decision, reader.take_buffer(), git_in, git_out, git_err, fields,
                    configured=private.forget, advertisement_only=advertisement_only, expires_at=expires_at,
                    advertised=advertised, results=results,
                )
            finally:
                private.forget()

        if decision.command != b"list for-push":
            return transfer(decision)
        from . import pushwatch

        # git runs the pre-push hook between the advertisement and the push commands, for
        # as long as it likes: the push gets its own token, minted when git sends it.
        # The push is audited across both transports: old SHAs from the advertisement the
        # first one answers, new ones from git's push lines, results from the second.
        watch = pushwatch.PushWatch()
        status = transfer(decision, advertisement_only=True, advertised=watch.advertisement_line)
        if status != 0:
            return status
        push = protocol.after_advertisement(reader, git_out.write, decision)
        if push.operation != "push":
            return 0
        watch.push(push, _resolver(env))
        status = transfer(push, results=watch.results)
        if watch.updates and not watch.dry_run:
            _record_push(used[-1], remote, watch, git_err)
        return status

    messages = io.StringIO()
    status = boundary(PROG, session, messages)
    if messages.getvalue():
        try:
            git_err.write(messages.getvalue().encode())
        except OSError:
            pass
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(args, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer)
    except KeyboardInterrupt:  # Ctrl-C outside the error boundary
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
