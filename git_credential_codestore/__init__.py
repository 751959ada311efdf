"""codestore: short-lived, least-privilege Code Storage credentials for plain git.

This package is imported by git's helpers on every fetch and push, so it imports
nothing here: each module pulls in only what its own job needs.

Ctrl-C is the user's, never a bug: a KeyboardInterrupt that reaches the top (while a
helper waits for git's input, during an import, in the interpreter's shutdown joining
threads) ends the process without a traceback; it still dies by SIGINT, so a shell
reads 130. The hooks are set here because every entry point imports this first.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

__version__ = "0.1.0"

_excepthook, _unraisablehook = sys.excepthook, sys.unraisablehook


def _excepthook_but_ctrl_c(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if not issubclass(kind, KeyboardInterrupt):
        _excepthook(kind, value, tb)


def _unraisablehook_but_ctrl_c(unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        _unraisablehook(unraisable)


sys.excepthook = _excepthook_but_ctrl_c
sys.unraisablehook = _unraisablehook_but_ctrl_c
