"""git's reading of GIT_TRACE_REDACT, GIT_TRACE_CURL and GIT_CURL_VERBOSE, checked against git.

Each table is asserted twice: against codestore's reading (gitenv), and against what the
real git does with the same value, so a table that drifts from git fails too.
"""

from __future__ import annotations

import http.server
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from git_credential_codestore import gitenv
from tests.realparts import http_server

# value -> what git_config_bool makes of it (None: git dies "bad boolean config value").
BOOLS: dict[str, bool | None] = {
    "": False, "0": False, "00": False, "000": False, "-0": False, "+0": False, "0x0": False, "0X0": False,
    "0k": False, "0K": False, "0m": False, "0g": False, "-0k": False, " 0": False, "\t0": False, "\n0": False,
    "false": False, "FALSE": False, "False": False, "no": False, "NO": False, "off": False, "Off": False,
    "1": True, "01": True, "07": True, "-1": True, "+1": True, "0x1": True, "0X10": True, "1k": True, "1K": True,
    "0x1g": True, "2097151k": True, "1g": True, "2147483647": True, "-2147483647": True, " 1": True,
    "true": True, "TRUE": True, "yes": True, "YeS": True, "on": True, "ON": True,
    "k": None, "m": None, "0x": None, "08": None, "09": None, "0 ": None, "1 ": None, " k": None, "+k": None,
    "-": None, "+": None, "1e": None, "1.0": None, "0.0": None, "2147483648": None, "-2147483648": None,
    "2097152k": None, "2g": None, "1t": None, "0kb": None, "banana": None, "truee": None, "y": None, "n": None,
    "nope": None, "１": None, "\u212a": None, "0\u212a": None, "- 1": None, "0x-1": None, "99999999999999999999": None,
}


def git_bool(value: str) -> bool | None:
    """The real git's verdict: `git config --type=bool` uses git_config_bool itself."""
    proc = subprocess.run(["git", "-c", f"x.y={value}", "config", "--type=bool", "x.y"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        assert "bad boolean config value" in proc.stderr, proc.stderr
        return None
    return {"true\n": True, "false\n": False}[proc.stdout]


@pytest.mark.parametrize("value,expected", BOOLS.items())
def test_booleans_are_read_as_git_reads_them(value: str, expected: bool | None) -> None:
    assert gitenv.parse_bool(value) is expected


def test_the_boolean_table_is_what_the_real_git_does() -> None:
    assert {v: git_bool(v) for v in BOOLS} == BOOLS


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789xXkKmMgG+- \tabefnorstuy", max_size=6))
@example("0x1G")
@example(" -0x0k")
def test_any_short_spelling_is_read_as_the_real_git_reads_it(value: str) -> None:
    assert gitenv.parse_bool(value) is git_bool(value)


# ---------------------------------------------------------------- the header itself


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with http_server(_NotFound) as url:
        yield f"{url}/r.git"


SENTINEL = "c2VudGluZWwtdmFsdWU"

REDACT = ["0", "00", "0x0", "-0", "0k", " 0", "false", "No", "OFF", "", "1", "true", "yes", "0x1", "2", "banana", "k", None]
CURL: list[dict[str, str]] = [
    {"GIT_TRACE_CURL": "1"}, {"GIT_TRACE_CURL": "true"}, {"GIT_TRACE_CURL": "TRUE"}, {"GIT_TRACE_CURL": "2"},
    {"GIT_TRACE_CURL": "3"}, {"GIT_TRACE_CURL": "@file"}, {"GIT_TRACE_CURL": "0"}, {"GIT_TRACE_CURL": "false"},
    {"GIT_TRACE_CURL": ""}, {"GIT_TRACE_CURL": "no"}, {"GIT_TRACE_CURL": "00"}, {"GIT_TRACE_CURL": "relative"},
    {"GIT_CURL_VERBOSE": "1"}, {"GIT_CURL_VERBOSE": "0"}, {"GIT_CURL_VERBOSE": ""}, {"GIT_CURL_VERBOSE": "false"},
    {"GIT_TRACE_CURL_NO_DATA": "1", "GIT_TRACE_CURL": "1"}, {"GIT_TRACE": "1", "GIT_TRACE_PACKET": "1"}, {},
]


def git_prints_header(env: dict[str, str], url: str, tmp_path: Path) -> bool:
    """Run a real git with an Authorization header in `env`; did the header reach any output?"""
    trace = tmp_path / "trace"
    # fd 3 open on a file, as a shell's `3>file` would leave it: GIT_TRACE_CURL=3 writes there.
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" 3>"$FD3"', "sh",
         "git", "-c", f"http.extraHeader=Authorization: Basic {SENTINEL}", "ls-remote", url],
        env=dict(os.environ, FD3=str(tmp_path / "fd3"), **env), capture_output=True, text=True, timeout=30,
    )
    outputs = [proc.stdout, proc.stderr, (tmp_path / "fd3").read_text()]
    if trace.exists():
        outputs.append(trace.read_text())
        trace.unlink()
    return any(SENTINEL in text for text in outputs)


# Every redaction spelling with curl tracing on, and every tracing spelling with redaction off.
CASES = [(r, {"GIT_TRACE_CURL": "1"}) for r in REDACT] + [("0", c) for c in CURL] + [(None, c) for c in CURL[:2] + CURL[12:14]]


@pytest.mark.parametrize(
    "redact,curl", CASES, ids=[f"{r!r}-" + (",".join(f"{k}={v!r}" for k, v in c.items()) or "none") for r, c in CASES]
)
def test_codestore_knows_exactly_when_git_prints_the_authorization_header(
    redact: str | None, curl: dict[str, str], http_url: str, tmp_path: Path
) -> None:
    # Threat: a spelling git reads as "no redaction" that codestore reads as "redact"
    # (GIT_TRACE_REDACT=00, GIT_CURL_VERBOSE=0, ...) and a token printed into a trace.
    env = {k: (str(tmp_path / "trace") if v == "@file" else v) for k, v in curl.items()}
    if redact is not None:
        env["GIT_TRACE_REDACT"] = redact
    predicted = gitenv.would_print_authorization(env)
    printed = git_prints_header(env, http_url, tmp_path)
    if gitenv.parse_bool(redact or "1") is None:
        # git dies on the value before its first request (nothing printed); codestore
        # refuses it too, on the safe side, whenever curl tracing is on.
        assert not printed and predicted is gitenv.curl_trace_on(env)
    else:
        assert predicted is printed
