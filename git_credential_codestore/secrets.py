"""Opaque holders for secrets: their repr and str never show the value.

A `Secret` must be revealed explicitly (`.reveal()`), so a secret that reaches a log
line, an f-string or an exception message shows as `<redacted>` instead.
"""

from __future__ import annotations


class Secret:
    """A secret string (a token, a grant, a PEM key)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("secrets are not picklable")


class Token(Secret):
    """A signed JWT, with the expiry the caller needs for `password_expiry_utc`."""

    __slots__ = ("expires_at",)

    def __init__(self, value: str, expires_at: int) -> None:
        super().__init__(value)
        self.expires_at = expires_at
