"""Read along a push session, and note what it changed.

A push takes two transports (see main.py): the first answers `list for-push`, the second,
with a token minted after git's pre-push hook, carries git's push commands. What passes
through the helper on the way is all text (the pack goes from the transport to the server,
never through here), and this module notes it:

    first transport -> git   the `list for-push` answer: `<sha> <ref>` per ref  -> old SHAs
    git -> helper            `option NAME VALUE` (answered by protocol.py; dry-run noted)
    git -> helper            `push [+]<src>:<dst>` lines, then a blank line    -> new SHAs
    second transport -> git  `ok <dst>` / `error <dst> <why>` (report-status-v2 may add
                             `option old-oid|new-oid|...` lines), then a blank line -> results

Imported only for pushes (it brings the audit module along). Every line reaches git
unchanged; what follows the results is copied as bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from git_credential_codestore.audit import ZERO, is_sha

from .protocol import Decision, LineReader

Write = Callable[[bytes], object]
Resolve = Callable[[str], "str | None"]


class PushWatch:
    """What one push session asked for and how the server answered, ref by ref."""

    def __init__(self) -> None:
        self.advertised: dict[str, str] = {}
        self.updates: list[dict[str, object]] = []
        self.dry_run = False

    def advertisement_line(self, line: bytes) -> None:
        """One line of the `list for-push` answer, on its way to git."""
        sha, _, ref = line.decode("utf-8", "replace").partition(" ")
        if is_sha(sha):
            self.advertised[ref] = sha

    def push(self, decision: Decision, resolve: Resolve) -> None:
        """git's push batch (after the hook), with the options it set since the preamble."""
        for line, reply in decision.replay:
            name, _, value = line[len(b"option ") :].partition(b" ") if line.startswith(b"option ") else (b"", b"", b"")
            if name == b"dry-run" and reply == b"ok":
                self.dry_run = value in (b"", b"true")
        self.updates.extend(_update(b, self.advertised, resolve) for b in decision.command.split(b"\n") if b)

    def results(self, child: LineReader, to_git: Write) -> None:
        """Pass the second transport's per-ref answers to git, noting each (a transport
        that hangs up first leaves the rest "unknown")."""
        _results(child, to_git, self.updates)

    def report(self) -> list[dict[str, object]]:
        """Ref updates in the audit trail's shape (only those git asked for)."""
        return [dict(u) for u in self.updates]


def _update(line: bytes, advertised: dict[str, str], resolve: Resolve) -> dict[str, object]:
    spec = line[len(b"push ") :].decode("utf-8", "replace")
    forced = spec.startswith("+")
    src, _, dst = spec.lstrip("+").rpartition(":")
    new = ZERO if not src else (src if is_sha(src) else resolve(src))
    return {
        "ref": dst,
        "old": advertised.get(dst, ZERO),
        "new": new or ZERO,
        "forced": forced,
        "result": "unknown",
    }


def _results(child: LineReader, to_git: Write, pending: list[dict[str, object]]) -> bool:
    """Pass the transport's per-ref answers to git, noting each; False if it hung up."""
    by_ref = {str(u["ref"]): u for u in pending}
    last: dict[str, object] | None = None
    while True:
        line = child.readline()
        if line is None:
            return False
        to_git(line + b"\n")
        if line == b"":
            return True
        text = line.decode("utf-8", "replace")
        word, _, rest = text.partition(" ")
        if word in ("ok", "error"):
            ref, _, why = rest.partition(" ")
            last = by_ref.get(ref)
            if last is not None:
                last["result"] = word
                if word == "error":
                    last["reason"] = why or "refused"
        elif word == "option" and last is not None:
            # report-status-v2: the server may say what it really did to the ref.
            key, _, value = rest.partition(" ")
            if key in ("old-oid", "new-oid") and is_sha(value):
                last["old" if key == "old-oid" else "new"] = value
            elif key == "forced-update":
                last["forced"] = True
