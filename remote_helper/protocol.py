"""git's remote-helper protocol, up to the command that says what this process is for.

git sends `capabilities`, then `option` lines, then one command that decides the
operation. Until then no token is needed, so we answer alone, exactly as
`git remote-https` would (the tables below are checked against the real one by
tests/test_remote_helper_protocol.py), and remember every line to replay to it later:

    list for-push, push, stateless-connect git-receive-pack     -> push (write token)
    stateless-connect git-upload-pack, list, fetch, get         -> read (read-only token)

A push is two steps for git: `list for-push` (the advertisement), then the pre-push
hook, which may run for minutes, then `option` lines and a batch of `push` lines. The
push commands get a transport (and a token) of their own, started when they arrive:
`after_advertisement` answers git until then.

A capability list that differs from the transport's makes `git clone` produce an empty
repository and exit 0, so ours is a copy of git 2.39's, and `connect` is never offered.
"""

from __future__ import annotations

from git_credential_codestore.errors import ProtocolError

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Callable

# `printf 'capabilities\n\n' | git remote-https origin https://example.invalid/x.git`
CAPABILITIES = (
    b"stateless-connect",
    b"fetch",
    b"get",
    b"option",
    b"push",
    b"check-connectivity",
    b"object-format",
)
MAX_LINE = 1 << 20

_BOOL = frozenset({b"true", b"false"})
_SPACE = b" \t\n\r\f\v"


def _is_int(value: bytes) -> bool:
    """git's option integers: optional leading space and sign, ASCII digits (no `re`: fast path)."""
    digits = value.lstrip(_SPACE)
    if digits[:1] in (b"+", b"-"):
        digits = digits[1:]
    if digits.endswith(b"\n"):  # as `$` allowed
        digits = digits[:-1]
    return digits.isdigit()


def _any(value: bytes) -> bool:
    return True


# remote-curl.c's set_option(): which options it takes and which values it accepts.
OPTIONS: dict[bytes, Callable[[bytes], bool]] = {
    b"verbosity": _is_int,
    b"progress": _BOOL.__contains__,
    b"depth": _is_int,
    b"deepen-since": _any,
    b"deepen-not": _any,
    b"deepen-relative": _BOOL.__contains__,
    b"followtags": _BOOL.__contains__,
    b"dry-run": _BOOL.__contains__,
    b"check-connectivity": _BOOL.__contains__,
    b"cas": _any,
    b"force-if-includes": _BOOL.__contains__,
    b"cloning": _BOOL.__contains__,
    b"update-shallow": _BOOL.__contains__,
    b"pushcert": {b"true", b"false", b"if-asked"}.__contains__,
    b"atomic": _BOOL.__contains__,
    b"push-option": _any,
    b"family": {b"ipv4", b"ipv6", b"all"}.__contains__,
    b"from-promisor": _any,
    b"refetch": _any,
    b"filter": _any,
    # remote-https dies on an unknown object format; refusing it here is the same outcome.
    b"object-format": {b"true", b"sha1", b"sha256"}.__contains__,
}


def option_reply(line: bytes) -> bytes:
    """The reply to `option NAME [VALUE]` (a missing value means "true", as in remote-curl)."""
    name, sep, value = line[len(b"option ") :].partition(b" ")
    check = OPTIONS.get(name)
    if check is None:
        return b"unsupported"
    return b"ok" if check(value if sep else b"true") else b"error invalid value"


class Decision:
    """What git asked for: "read", "push" or "end" (git left before needing the server)."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        # Lines to replay to the transport, each with the reply we gave git (None: a list).
        self.replay: list[tuple[bytes, bytes | None]] = []
        self.command = b""


class LineReader:
    """Reads LF-terminated lines from `read(n)` and keeps whatever arrived beyond them."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.buffer = b""
        self.eof = False

    def readline(self) -> bytes | None:
        """The next line without its LF; None at end of input."""
        while True:
            i = self.buffer.find(b"\n")
            if i >= 0:
                line, self.buffer = self.buffer[:i], self.buffer[i + 1 :]
                return line
            if self.eof:
                return None
            if len(self.buffer) > MAX_LINE:
                raise ProtocolError(f"a protocol line longer than {MAX_LINE} bytes")
            chunk = self._read(65536)
            if not chunk:
                self.eof = True
                if self.buffer:
                    raise ProtocolError("input ended in the middle of a protocol line")
            self.buffer += chunk

    def take_buffer(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data


def classify(command: bytes) -> str | None:
    """ "read" or "push" for a deciding command; None for one we do not serve."""
    word, _, arg = command.partition(b" ")
    if command == b"list for-push" or word == b"push":
        return "push"
    if word == b"stateless-connect":
        return "push" if arg == b"git-receive-pack" else "read"
    if word in (b"list", b"fetch", b"get"):
        return "read"
    return None


def negotiate(reader: LineReader, write: Callable[[bytes], object]) -> Decision:
    """Answer git until its first deciding command; `write` must flush."""
    decision = Decision("end")
    while True:
        line = reader.readline()
        if line is None or line == b"":
            # remote-curl ends the session the same way, without touching the network.
            return decision
        if line == b"capabilities":
            write(b"\n".join(CAPABILITIES) + b"\n\n")
            decision.replay.append((line, None))
        elif line.startswith(b"option "):
            reply = option_reply(line)
            write(reply + b"\n")
            decision.replay.append((line, reply))
        else:
            operation = classify(line)
            if operation is None:
                name = line.split(b" ", 1)[0][:40].decode("ascii", "replace")
                raise ProtocolError(
                    f"git sent the remote-helper command {name!r}, which codestore does not serve; "
                    "is this git newer than codestore? please report it"
                )
            decision.operation = operation
            decision.command = line
            return decision


def after_advertisement(reader: LineReader, write: Callable[[bytes], object], first: Decision) -> Decision:
    """After `list for-push` was answered: answer options until git's `push` batch.

    Returns the push to run (the batch, up to its blank line, as its command, replayed
    after the first preamble and every option since), or "end" when git has nothing to
    push (it closes the session without sending any).
    """
    decision = Decision("end")
    decision.replay = list(first.replay)
    while True:
        line = reader.readline()
        if line is None or line == b"":
            return decision
        if line.startswith(b"option "):
            reply = option_reply(line)
            write(reply + b"\n")
            decision.replay.append((line, reply))
            continue
        if not line.startswith(b"push "):
            name = line.split(b" ", 1)[0][:40].decode("ascii", "replace")
            raise ProtocolError(f"git sent {name!r} after the push advertisement, where codestore expects push commands; please report it")
        batch = [line]
        while (more := reader.readline()) not in (b"", None):
            if not more.startswith(b"push "):
                raise ProtocolError("git mixed other commands into a batch of push commands; please report it")
            batch.append(more)
        decision.operation = "push"
        # The blank line that ends the batch is the command's own line end.
        decision.command = b"\n".join(batch) + b"\n"
        return decision
