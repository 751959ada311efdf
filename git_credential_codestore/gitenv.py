"""git's own reading of the environment that decides whether it prints HTTP headers.

A reading that differs from git's by one spelling is a leak (`GIT_TRACE_REDACT=00` is
false to git), so these copy git 2.39's C code rule for rule, and
tests/test_gitenv.py checks them against the real git:

- GIT_TRACE_REDACT is read with git_env_bool(), i.e. git_config_bool() (config.c):
  "" and true/yes/on/false/no/off in any ASCII case; else an int as strtoimax(base 0)
  reads it (leading C whitespace, a sign, 0x hex, 0 octal) times an optional k/m/g
  unit, nonzero meaning true and more than INT_MAX meaning invalid. git dies on an
  invalid value before its first request.
- GIT_TRACE_CURL is a trace key (trace.c get_trace_fd()): unset, "", "0" or "false"
  (any case) is off; "1" or "true" is stderr; another single digit is that fd; an
  absolute path is a file; anything else is off with a warning.
- GIT_CURL_VERBOSE set at all, even to "" or "0", turns GIT_TRACE_CURL on to stderr
  (http.c: `if (getenv("GIT_CURL_VERBOSE")) trace_override_envvar(...)`).

With curl tracing on and redaction off, git prints `Authorization:` headers in full.
Kept free of imports: the credential helper reads it on every request.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping

INT_MAX = 2**31 - 1
_C_SPACE = b" \t\n\v\f\r"
_UNITS = {b"": 1, b"k": 1 << 10, b"m": 1 << 20, b"g": 1 << 30}
_HEX = b"0123456789abcdefABCDEF"


def _bytes(value: str) -> bytes:
    # os.environ decodes with surrogateescape; git sees the original bytes.
    return os.fsencode(value)


def parse_int(value: str) -> int | None:
    """git_parse_int(): the int git reads, or None where git calls the value invalid."""
    raw = _bytes(value)
    i = 0
    while i < len(raw) and raw[i] in _C_SPACE:
        i += 1
    sign = 1
    if i < len(raw) and raw[i] in b"+-":
        sign = -1 if raw[i] == ord("-") else 1
        i += 1
    if raw[i : i + 2] in (b"0x", b"0X") and raw[i + 2 : i + 3] and raw[i + 2] in _HEX:
        base, digits, i = 16, _HEX, i + 2
    elif raw[i : i + 1] == b"0":
        base, digits = 8, b"01234567"
    else:
        base, digits = 10, b"0123456789"
    start = i
    while i < len(raw) and raw[i] in digits:
        i += 1
    if i == start:
        return None  # no digits at all: strtoimax consumed nothing
    magnitude = int(raw[start:i], base)
    factor = _UNITS.get(raw[i:].lower())
    if factor is None or magnitude * factor > INT_MAX:
        return None  # an unknown unit, or out of range for an int
    return sign * magnitude * factor


def parse_bool(value: str) -> bool | None:
    """git_config_bool() of a set value: True, False, or None where git dies."""
    raw = _bytes(value).lower()
    if raw in (b"", b"false", b"no", b"off"):
        return False
    if raw in (b"true", b"yes", b"on"):
        return True
    number = parse_int(value)
    return None if number is None else number != 0


def trace_key_on(value: str | None) -> bool:
    """get_trace_fd(): True when git writes this trace somewhere (stderr, an fd, a file)."""
    if value is None:
        return False
    raw = _bytes(value)
    if raw in (b"", b"0") or raw.lower() == b"false":
        return False
    if raw == b"1" or raw.lower() == b"true":
        return True
    return (len(raw) == 1 and raw.isdigit()) or raw.startswith(b"/")


def curl_trace_on(env: Mapping[str, str]) -> bool:
    """git traces curl (headers included) to stderr, an fd or a file."""
    return "GIT_CURL_VERBOSE" in env or trace_key_on(env.get("GIT_TRACE_CURL"))


def redaction_on(env: Mapping[str, str]) -> bool:
    """git redacts Authorization headers in its traces (an invalid value counts as off)."""
    value = env.get("GIT_TRACE_REDACT")
    return value is None or parse_bool(value) is True


def would_print_authorization(env: Mapping[str, str]) -> bool:
    """A git run in `env` would write an Authorization header into a trace."""
    return curl_trace_on(env) and not redaction_on(env)
