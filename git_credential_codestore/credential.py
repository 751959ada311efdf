"""git-credential-codestore: git's credential-helper protocol, answered with fresh JWTs.

    get    for our host: username=t, a token for the repository in `path`, its expiry.
           for any other host: nothing at all, so git's other helpers serve it.
    store  accepted and ignored: a short-lived token is never saved anywhere.
    erase  accepted and ignored, for the same reason.

git shows our stderr to the user, so every failure is one line; when we serve the host
but cannot produce a token we answer `quit=1`, which stops git at once instead of
letting it fall through to a prompt that would hang a headless sandbox.

Startup is paid on every fetch and push: nothing heavy is imported until a token must
really be minted, and `store`/`erase` never read the configuration at all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from .errors import ProtocolError
from .lines import parse_lines

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
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


_GIT_FALSE = ("", "0", "false", "no", "off")


def trace_would_print_token(env: Mapping[str, str]) -> bool:
    """git prints the Authorization header in curl traces when redaction is turned off.

    We run inside git's environment, so we can see it coming: GIT_TRACE_REDACT=0 with
    GIT_TRACE_CURL or GIT_CURL_VERBOSE on.
    """
    redaction_off = env.get("GIT_TRACE_REDACT", "1").strip().lower() in _GIT_FALSE
    tracing = any(env.get(k, "").strip().lower() not in _GIT_FALSE for k in ("GIT_TRACE_CURL", "GIT_CURL_VERBOSE"))
    return redaction_off and tracing


def get(fields: Mapping[str, str], env: Mapping[str, str]) -> list[str]:
    """The reply lines for a `get` request; [] when the host is not ours."""
    from . import config

    cfg = config.load(env)
    if not cfg.serves(fields.get("protocol", ""), fields.get("host", "")):
        return []
    from .errors import CodestoreError, ConfigError

    if trace_would_print_token(env):
        raise ConfigError(
            "GIT_TRACE_REDACT=0 with GIT_TRACE_CURL (or GIT_CURL_VERBOSE) would write the token into the trace; "
            "unset GIT_TRACE_REDACT to trace with the header redacted"
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
    from .agent.discovery import holds_grant
    from .source import get_token
    from .vocab import TokenRequest

    if holds_grant(env):
        # The grant is the policy: ask for at most read+write; the agent narrows it.
        request = TokenRequest(repo, ("git:read", "git:write"), ephemeral, purpose="credential", narrow=True)
    else:
        request = TokenRequest(repo, cfg.scopes_for(repo, ephemeral), ephemeral, purpose="credential")
    token = get_token(request, cfg, env)
    return ["username=t", f"password={token.reveal()}", f"password_expiry_utc={token.expires_at}"]


def run(argv: Sequence[str], stdin: BinaryIO, stdout: BinaryIO, stderr: BinaryIO, env: Mapping[str, str]) -> int:
    if len(argv) != 1:
        stderr.write(f"{PROG}: usage: {PROG} get|store|erase (git runs this for you)\n".encode())
        return 2
    operation = argv[0]
    try:
        data = _read_request(stdin)
    except ProtocolError as e:
        stderr.write(f"{PROG}: {e}\n".encode())
        return 1
    if operation != "get":
        # store, erase, and operations added by future gits: nothing to save, nothing to say.
        return 0
    try:
        fields = parse(data)
    except ProtocolError as e:
        stderr.write(f"{PROG}: {e}\n".encode())
        return 1
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
    # git ignores a helper's exit status; 0 keeps `quit=1` the only signal it acts on.
    return 0 if status in (0, 1) else status


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    status = run(args, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer, os.environ)
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
