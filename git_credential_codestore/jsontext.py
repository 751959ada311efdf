"""JSON from outside (a client's request, a server's answer, a file, a database row).

`loads` is json.loads with every way it refuses a text raised as ValueError: nesting
deeper than the parser's stack ("[" * 30000, 60 KB) raises RecursionError, which is no
ValueError, and so went past every `except ValueError` that meant "not JSON": the agent
answered a 500 and logged a line per request, a helper crashed. Every parse in the
package goes through here (tests/test_errors.py holds it to that).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs the helpers milliseconds to import: for type checkers only
if TYPE_CHECKING:
    from typing import Any


def loads(data: str | bytes | bytearray) -> Any:
    import json  # here: the git helpers import this module, and parse JSON only on some paths

    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than it can be read") from None


def segment(part: str) -> bytes:
    """A JWT segment's bytes: base64url without its padding (RFC 7515, section 2), read
    with the same leniency as base64's. A malformed one raises ValueError (binascii.Error)."""
    import binascii

    return binascii.a2b_base64(part.replace("-", "+").replace("_", "/") + "=" * (-len(part) % 4))
