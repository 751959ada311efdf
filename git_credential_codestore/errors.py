"""The one exception tree of codestore, and the boundary that turns it into a message.

Every expected failure is a `CodestoreError` whose text is a single line naming what
failed, the likely cause and the fix. Messages never carry a token or key: callers
build them from names and ids only, and `redact` scrubs anything that slipped in.
"""

from __future__ import annotations

import os
import sys

# Every git helper imports this module; `typing` and `re` cost milliseconds each to
# import, so type-only names are imported for type checkers alone and the patterns
# below are compiled on first use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TextIO


def _patterns() -> list[tuple[object, str]]:
    import re

    global _PATTERNS
    if not _PATTERNS:
        _PATTERNS = [
            (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), "<redacted key>"),
            # Anything shaped like a JWT, Basic/Bearer credentials, or userinfo in a URL.
            (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "<redacted>"),
            # What is left of one cut short (a message that truncated a value): base64url of '{"'.
            (re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*)*"), "<redacted>"),
            (re.compile(r"(?i)(authorization:\s*(?:basic|bearer|grant|identity)\s+)\S+"), r"\1<redacted>"),
            # A grant secret (csg_<id>_<random>): its id may stay, to say which grant leaked.
            (re.compile(r"\b(csg_[A-Za-z0-9]{1,32})_[A-Za-z0-9_-]+"), r"\1_<redacted>"),
            (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@"), r"\1<redacted>@"),
        ]
    return _PATTERNS


_PATTERNS: list[tuple[object, str]] = []


def for_terminal(text: str) -> str:
    """`text` with every character a terminal would act on (C0 and C1 controls, DEL, and
    other non-printables such as bidi overrides) written as an escape: what other people
    chose (a sandbox's report or commit message, a server's answer, a repository id) is
    shown, never run as cursor moves, colours or clipboard writes (OSC 52)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


# What each of _patterns needs in a text, lower-cased: a text without any of them has
# nothing to redact, found by a few substring searches instead of six regexes.
_MARKS = ("eyj", "csg_", "private key", "authorization", "@")


def redact(text: str) -> str:
    """Remove token- and key-shaped material from text meant for a human."""
    lowered = text.lower()
    if not any(mark in lowered for mark in _MARKS):
        return text
    for pattern, replacement in _patterns():
        text = pattern.sub(replacement, text)  # type: ignore[attr-defined]
    return text


class CodestoreError(Exception):
    """An expected failure: shown to the user as one line, exit status 1."""

    exit_code = 1

    def __str__(self) -> str:
        text = for_terminal(redact(" ".join(super().__str__().split())))
        if len(text) > MAX_MESSAGE:
            # A value someone passed (a 6000-character repository id, 300 replica URLs) is
            # cut in the middle: the line still says what failed first and the fix last.
            text = f"{text[:MAX_MESSAGE * 3 // 5]} ... {text[-MAX_MESSAGE * 2 // 5:]}"
        return text


MAX_MESSAGE = 600  # characters of one error line


class UsageError(CodestoreError):
    """A command line that cannot run as given (exit status 2, as usage errors are)."""

    exit_code = 2


class ConfigError(CodestoreError):
    """Configuration is missing or invalid."""


class KeyNotFound(CodestoreError):
    """No private key (and no agent) is available to mint a token."""


class TokenError(CodestoreError):
    """A token could not be minted, or a presented token is invalid."""


class PolicyError(CodestoreError):
    """The request asks for more than configuration or a grant allows."""


class RemoteError(CodestoreError):
    """A server (Code Storage, the dev server, the agent) refused or failed."""


class GitError(CodestoreError):
    """A git command failed."""


class InvalidKey(CodestoreError):
    """A key was found but cannot be used: an unsupported type or kind (not "no key")."""


class ProtocolError(CodestoreError):
    """A peer sent something that is not its protocol: git's credential or remote-helper
    lines, the agent's wire format. The message names the line or field, never its value
    (a malformed stream may hold a password)."""


class Refused(CodestoreError):
    """A request a server will not serve: an HTTP status and a one-line reason.

    The one refusal type of the dev server (git and REST) and the agent. The reason goes
    to the client and the request or audit log, so it is redacted and kept to one line
    whatever went in; `claims` are the verified token's, when known (for the log).
    """

    def __init__(self, status: int, reason: str, claims: object = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = redact(" ".join(reason.split()))[:300]
        self.claims = claims


def expired_during_push(ttl_setting: str) -> str:
    """Why a token the server accepted at the start of a push was refused at its end."""
    return (
        "the token expired during the push: a hook or a slow step took longer than the TTL; "
        f"raise the TTL ({ttl_setting}) or make the slow step faster"
    )


def crash_log_path() -> str:
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("codestore"), "crash.log")


def boundary(prog: str, func: Callable[[], int], stderr: TextIO | None = None) -> int:
    """Run `func`, mapping expected errors to exit 1, Ctrl-C to 130 and bugs to 3.

    A bug's traceback goes to a log file (redacted), never to the terminal: git shows
    helper stderr to users and agents copy it into transcripts.
    """
    err = stderr or sys.stderr
    try:
        return func()
    except CodestoreError as e:
        from .trace import say

        say(prog, f"refused ({type(e).__name__}): {e}")  # no exit status: the credential helper's is 0 (git reads quit=1)
        print(f"{prog}: {e}", file=err)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - this is the boundary
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            # The machine, not a bug: a path that is a directory, a directory we may not
            # write, a full disk. Said in one line with the path, for the user to fix.
            from .trace import say

            other = f" -> {e.filename2}" if e.filename2 is not None else ""
            line = redact(" ".join(f"cannot use {e.filename}{other}: {e.strerror}; check that path and its permissions".split()))
            say(prog, f"refused (OSError): {line}")
            print(f"{prog}: {line}", file=err)
            return 1
        import traceback

        path = crash_log_path()
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            from .files import open_append  # private, as all state; a pipe nobody reads fails, never waits

            with open(open_append(path), "a", encoding="utf-8") as f:
                f.write(redact(traceback.format_exc()) + "\n")
            where = f"details in {path}"
        except OSError:
            where = "no crash log could be written"
        from .trace import say

        say(prog, f"internal error ({type(e).__name__}); {where}")
        print(f"{prog}: internal error ({type(e).__name__}); {where}; please report it", file=err)
        return 3
