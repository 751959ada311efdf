"""Relay a push session line by line, and note what it changed.

For a push, everything between git and its transport is text (the pack goes from the
transport to the server, never through here), so instead of splicing bytes we relay the
remote-helper protocol a line at a time and read along:

    transport -> git   the `list for-push` answer: `<sha> <ref>` per ref  -> old SHAs
    git -> transport   `option NAME VALUE` (one reply line each)
    git -> transport   `push [+]<src>:<dst>` lines, then a blank line       -> new SHAs
    transport -> git   `ok <dst>` / `error <dst> <why>` (report-status-v2 may add
                       `option old-oid|new-oid|...` lines), then a blank line -> results

Imported only for pushes (it brings the audit module along).
A command this module does not know ends the reading-along: the rest is copied blind,
so an unexpected git never breaks a push (it only goes unrecorded).
"""

from __future__ import annotations

from collections.abc import Callable

from git_credential_codestore.audit import ZERO, is_sha

from .protocol import LineReader

Write = Callable[[bytes], None]
Resolve = Callable[[str], "str | None"]


class PushWatch:
    """What one push session asked for and how the server answered, ref by ref."""

    def __init__(self) -> None:
        self.advertised: dict[str, str] = {}
        self.updates: list[dict[str, object]] = []
        self.dry_run = False
        self.unfollowed = False  # something we could not read along; the record may be incomplete

    def report(self) -> list[dict[str, object]]:
        """Ref updates in the audit trail's shape (only those git asked for)."""
        return [dict(u) for u in self.updates]


def relay(
    watch: PushWatch,
    git: LineReader,
    child: LineReader,
    to_git: Write,
    to_child: Write,
    resolve: Resolve,
) -> bool:
    """Relay until git ends the session, noting what happens in `watch` as it happens (so
    it holds the results even when a pipe breaks afterwards). Returns False when the
    caller must copy whatever is left blind, both ways (buffers are left in the readers)."""
    # 1. The advertisement, answering `list for-push`.
    while True:
        line = child.readline()
        if line is None:
            return True
        to_git(line + b"\n")
        if line == b"":
            break
        sha, _, ref = line.decode("utf-8", "replace").partition(" ")
        if is_sha(sha):
            watch.advertised[ref] = sha
    # 2. git's commands, each answered before the next.
    while True:
        line = git.readline()
        if line is None:
            return True
        if line == b"":
            try:
                to_child(b"\n")  # git's goodbye; the transport exits on it
            except BrokenPipeError:
                return True  # it already has (after a failed push, remote-curl may die first)
            continue
        if line.startswith(b"option "):
            to_child(line + b"\n")
            reply = child.readline()
            if reply is None:
                return True
            to_git(reply + b"\n")
            name, _, value = line[len(b"option ") :].partition(b" ")
            if name == b"dry-run" and reply == b"ok":
                watch.dry_run = value in (b"", b"true")
            continue
        if line.startswith(b"push "):
            batch = [line]
            while True:
                more = git.readline()
                if more is None or more == b"":
                    break
                batch.append(more)
            to_child(b"".join(b + b"\n" for b in batch) + b"\n")
            pending = [_update(b, watch.advertised, resolve) for b in batch]
            watch.updates.extend(pending)
            if not _results(child, to_git, pending):
                return True
            continue
        # Not a push command we know: hand it over and stop reading along.
        to_child(line + b"\n")
        watch.unfollowed = True
        return False


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
