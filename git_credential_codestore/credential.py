"""git-credential-codestore: git's credential-helper protocol, answered with fresh JWTs.

    get    for our host: username=t, a token for the repository in `path`, its expiry.
           for any other host: nothing at all, so git's other helpers serve it.
    store  accepted and ignored: a short-lived token is never saved anywhere.
    erase  nothing to delete, for the same reason; but git erases after the server
           refused the credential, so when the refused token is one of ours that had
           expired, we say that the push outlasted its token (a pre-push hook, a slow
           upload), which is what happened, instead of leaving git's "Authentication
           failed" to suggest a bad key.

git shows our stderr to the user, so every failure is one line; when we serve the host
but cannot produce a token we answer `quit=1`, which stops git at once instead of
letting it fall through to a prompt that would hang a headless sandbox.

Startup is paid on every fetch and push: nothing heavy is imported until a token must
really be minted, and `store`/`erase` never read the configuration at all.
"""

from __future__ import annotations

import os
import sys

from .errors import ProtocolError
from .lines import parse_lines

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import BinaryIO

PROG = "git-credential-codestore"
MAX_INPUT = 64 * 1024  # git's own requests are a few hundred bytes

def parse(data: bytes) -> dict[str, str]:
    """`key=value` lines up to a blank line; `key[]` lines keep the last value.

    Values are never echoed in errors: a malformed stream may hold a password.
    """
    return dict(parse_lines(data, what="the credential input"))


def _read_request(stdin: BinaryIO) -> bytes:
    data = stdin.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise ProtocolError(f"credential input is larger than {MAX_INPUT} bytes")
    return data


def get(fields: Mapping[str, str], env: Mapping[str, str]) -> list[str]:
    """The reply lines for a `get` request; [] when the host is not ours."""
    from . import config
    from .trace import say

    # protocol, host and path only: git may also send a username or a stored password.
    say("credential", f"get {fields.get('protocol', '?')}://{fields.get('host', '?')}/{fields.get('path', '')}", env)
    # With several orgs configured, the host git asks about picks the org.
    cfg = config.load(env, host=(fields.get("protocol", ""), fields.get("host", "")))
    if not cfg.serves(fields.get("protocol", ""), fields.get("host", "")):
        say("credential", f"not our host (this helper serves {cfg.base_url if cfg.org or cfg.base_url_setting else 'no host: no org configured'}); silent", env)
        return []
    from .errors import CodestoreError, ConfigError
    from .gitenv import would_print_authorization

    if would_print_authorization(env):
        # git reads these exactly as gitenv does, so this is the case where it would print.
        raise ConfigError(
            f"GIT_TRACE_REDACT={env.get('GIT_TRACE_REDACT', '')!r} with GIT_TRACE_CURL (or GIT_CURL_VERBOSE, set to anything) "
            "would write the token into the trace; unset GIT_TRACE_REDACT to trace with the header redacted"
        )
    path = fields.get("path")
    if not path:
        raise ConfigError(
            "git sent no repository path, so no token can be scoped to one; run: codestore setup "
            f"(or git config --global credential.{cfg.base_url}.useHttpPath true)"
        )
    try:
        repo, ephemeral = cfg.repo_from_path(path)
    except CodestoreError as e:
        raise ConfigError(f"{e}; use a URL like {cfg.base_url}/<repo>.git") from None
    from .agent.discovery import agent_named
    from .source import get_token
    from .vocab import TokenRequest

    if cfg.uses_env and agent_named(env):  # the environment's agent speaks for the env-configured org only
        # The agent is the policy (a grant's terms, or the owner's configuration there): ask
        # for at most read+write, since git does not say whether it fetches or pushes.
        request = TokenRequest(repo, ("git:read", "git:write"), ephemeral, purpose="credential", narrow=True)
    else:
        request = TokenRequest(repo, cfg.scopes_for(repo, ephemeral), ephemeral, purpose="credential")
    say("credential", f"asking for {repo}{' (+ephemeral)' if ephemeral else ''}: {' '.join(request.scopes)}"
        f"{' at most (the agent decides)' if request.narrow else ''}", env)
    token = get_token(request, cfg, env)
    say("credential", f"answered with a token for {repo}, expiring at {token.expires_at}", env)
    return ["username=t", f"password={token.reveal()}", f"password_expiry_utc={token.expires_at}"]


def refused_because_expired(fields: Mapping[str, str], env: Mapping[str, str]) -> str | None:
    """Why git erases this credential, when the answer is "our token ran out" (else None).

    The token's own `exp` and `iat` say so; its signature does not matter here (we
    only explain a refusal, we grant nothing), and a value that is not our JWT is
    simply not explained. git runs `erase` only after a failure, so the cost is fine.
    """
    import time

    from . import config, jsontext
    from .errors import CodestoreError, expired_during_push

    try:
        if not config.load(env).serves(fields.get("protocol", ""), fields.get("host", "")):
            return None
        payload = fields["password"].split(".")[1]
        claims = jsontext.loads(jsontext.segment(payload))
        exp, iat = claims["exp"], claims["iat"]
    except (CodestoreError, IndexError, KeyError, TypeError, ValueError):
        return None
    if not (isinstance(exp, int) and isinstance(iat, int)) or time.time() < exp:
        return None
    return (
        expired_during_push(f"it was {exp - iat} s: CODESTORE_TTL, at most 3600")
        + "; or push through codestore://, which mints the push's token after the hook"
    )


# Options git passes from the helper line (`helper = codestore --org acme`, written by
# `codestore setup --system`): they name the host this line serves, for users who have
# no codestore configuration of their own, and win over the environment.
HELPER_OPTIONS = {"--org": "CODESTORE_ORG", "--base-url": "CODESTORE_BASE_URL"}


def run(argv: Sequence[str], stdin: BinaryIO, stdout: BinaryIO, stderr: BinaryIO, env: Mapping[str, str]) -> int:
    if list(argv) in (["--help"], ["-h"]):
        stdout.write(f"usage: {PROG} [--org ORG] [--base-url URL] get|store|erase|--version\n"
                     "git runs this for you: git config credential.helper codestore (or: codestore setup)\n".encode())
        return 0
    if list(argv) == ["--version"]:
        from . import __version__

        stdout.write(f"{PROG} {__version__}\n".encode())
        return 0
    options, overrides = list(argv[:-1]), {}
    while len(options) >= 2 and options[0] in HELPER_OPTIONS:
        name = options.pop(0)
        overrides[HELPER_OPTIONS[name]] = options.pop(0)
    if len(argv) < 1 or options:
        stderr.write(f"{PROG}: usage: {PROG} [--org ORG] [--base-url URL] get|store|erase|--version (git runs this for you)\n".encode())
        return 2
    if overrides:
        env = {**env, **overrides}
    operation = argv[-1]

    def malformed(e: ProtocolError) -> int:
        # An expected failure like any other (README): one line, and for `get` the `quit=1`
        # git acts on; the exit status stays 0, which git ignores anyway.
        if operation == "get":
            stdout.write(b"quit=1\n")
        stderr.write(f"{PROG}: {e}\n".encode())
        return 0

    try:
        data = _read_request(stdin)
    except ProtocolError as e:
        return malformed(e)
    if operation not in ("get", "erase"):
        # store, and operations added by future gits: nothing to save, nothing to say.
        return 0
    try:
        fields = parse(data)
    except ProtocolError as e:
        return malformed(e)
    if operation == "erase":
        if fields.get("username") == "t" and fields.get("password", "").startswith("eyJ"):
            explanation = refused_because_expired(fields, env)
            if explanation:
                stderr.write(f"{PROG}: {explanation}\n".encode())
        return 0
    from .errors import CodestoreError, boundary

    reply: list[str] = []

    def answer() -> int:
        try:
            reply.extend(get(fields, env))
        except CodestoreError:
            reply[:] = ["quit=1"]
            raise
        return 0

    import io

    err = io.StringIO()
    status = boundary(PROG, answer, err)
    if status != 0:
        reply[:] = ["quit=1"]
    if reply:
        stdout.write(("\n".join(reply) + "\n").encode())
    stderr.write(err.getvalue().encode())
    from .config import debug_enabled

    if debug_enabled(env):
        # CODESTORE_DEBUG (or the official helper's PIERRE_DEBUG): what was asked and how
        # it ended. Only protocol, host and path: never a password field or the token.
        where = f"{fields.get('protocol', '?')}://{fields.get('host', '?')}/{fields.get('path', '')}"
        outcome = "quit" if reply == ["quit=1"] else ("a token" if reply else "not this helper's host")
        from .errors import for_terminal

        stderr.write(f"{PROG}: debug: get {for_terminal(where)}: {outcome}\n".encode())
    # git ignores a helper's exit status; 0 keeps `quit=1` the only signal it acts on. A
    # usage error here is the environment's (a bad CODESTORE_AGENT_URL), not git's command line.
    return 0 if status in (0, 1, 2) else status


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        status = run(args, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer, os.environ)
    except KeyboardInterrupt:  # Ctrl-C while git's request is read (before the error boundary)
        return 130
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
