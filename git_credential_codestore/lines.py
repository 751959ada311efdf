"""git's `key=value` lines: the credential protocol's format, and the agent's token wire.

One parser for both (stdlib only, no imports: both git helpers run it on every request).
Errors name the line, never its value: a malformed stream may hold a password.
"""

from __future__ import annotations

from .errors import ProtocolError

_CONTROLS = frozenset(map(chr, range(32))) | {"\x7f"}


def has_control(text: str) -> bool:
    """A C0 control character or DEL: what the agent's wire refuses, in either direction."""
    # Both run in C: the agent checks every token it sends (a per-character generator was
    # a tenth of the agent's CPU per token). ASCII text (isascii is O(1) in CPython) is
    # printable exactly when it holds no C0 control and no DEL; other text takes the set
    # test, since isprintable() also refuses Unicode spaces that are allowed here.
    if text.isascii():
        return not text.isprintable()
    return not _CONTROLS.isdisjoint(text)


def has_surrogate(text: str) -> bool:
    """A lone surrogate: only an escape makes one (JSON's \\ud800), and no database driver
    can encode it as UTF-8."""
    return not text.isascii() and any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def parse_lines(
    data: bytes, *, what: str, max_lines: int | None = None, controls: bool = True, stop_at_blank: bool = True
) -> list[tuple[str, str]]:
    """`key=value` pairs in order (repeated keys kept: the caller decides what they mean).

    git's credential format (the defaults): up to the first blank line, a CR before the
    LF tolerated, control characters other than NUL allowed in values. The agent's wire
    (`controls=False, stop_at_blank=False`): no control character anywhere, blank lines
    skipped, at most `max_lines` pairs.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    pairs: list[tuple[str, str]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if controls:
            line = line.rstrip("\r")
        if not line:
            if stop_at_blank:
                break
            continue
        if max_lines is not None and len(pairs) >= max_lines:
            raise ProtocolError(f"{what} has more than {max_lines} lines")
        key, sep, value = line.partition("=")
        if not sep or not key or "\0" in line or (not controls and has_control(line)):
            raise ProtocolError(f"line {n} of {what} is not key=value")
        pairs.append((key, value))
    return pairs
