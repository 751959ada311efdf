"""Variants of the classes fixed after the first probe, found by a second one: text others
chose reaches a terminal escaped, settings that would become URLs, paths or header values
are refused at load, and a cut-short token is still redacted."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from git_credential_codestore.agent import trust, workload
from git_credential_codestore.errors import ConfigError, redact
from tests.conftest import BIN, ORG, OrgKey, run_cli
from tests.realparts import http_server, send_json

ESCAPES = "\x1b]0;PWNED\x07\x1b[31m\u202e\x9b"


def _no_escapes(text: str) -> bool:
    return not any(c in text for c in "\x1b\x07\u202e\x9b")


@pytest.fixture
def answering() -> Iterator[str]:
    """An API server whose every answer is 200 with a commit_sha that is not one."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            send_json(self, {"commit_sha": "abc" + ESCAPES})

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Handler) as url:
        yield url


def test_a_promotion_the_server_answers_with_no_commit_id_is_said_not_echoed(org_key: OrgKey, answering: str) -> None:
    env = dict(os.environ, CODESTORE_API_URL=answering, CODESTORE_SCOPES="git:read git:write", CODESTORE_AGENT="off")
    proc = run_cli("codestore", "promote", "team/app", "feat", env=env)
    assert proc.returncode == 0 and _no_escapes(proc.stdout + proc.stderr), proc
    assert "did not say which commit" in proc.stderr and "PWNED" not in proc.stdout + proc.stderr


def test_a_trust_issuer_holding_control_characters_is_refused() -> None:
    with pytest.raises(ConfigError, match="--issuer"):
        trust.parse_policy({"issuer": "https://iss.example/" + ESCAPES, "audience": "a", "claims": [["sub", "x"]], "repos": ["team/app"]})


@pytest.mark.parametrize("var", ["CODESTORE_TRACE", "CODESTORE_DEBUG"])
def test_trace_and_debug_lines_show_hosts_and_paths_escaped(org_key: OrgKey, var: str) -> None:
    # The path (and the host) come from a URL someone else may have chosen (git decodes %1b).
    proc = run_cli("git-credential-codestore", "get", input=f"protocol=https\nhost=evil{ESCAPES}.example\npath=team/{ESCAPES}app.git\n\n",
                   env=dict(os.environ, **{var: "1"}))
    assert "get https://evil\\x1b]0;PWNED" in proc.stderr and _no_escapes(proc.stderr), proc.stderr


@pytest.mark.parametrize("value, says", [
    ("http://127.0.0.1:1/\x1b]0;PWN\x07", "printable characters"),
    ("http://127.0.0.1:1/a\nb", "printable characters"),
    ("http://127.0.0.1\t:1", "printable characters"),
    ("http://127.0.0.1:1/a b", "without spaces"),
])
@pytest.mark.parametrize("var", ["CODESTORE_BASE_URL", "CODESTORE_API_URL"])
def test_a_url_setting_that_would_break_git_config_or_a_request_is_refused_at_load(var: str, value: str, says: str) -> None:
    # It crashed doctor and repo list (InvalidURL, exit 3), and a newline reached git's config.
    for args in (("config", "show"), ("doctor",), ("setup",)):
        proc = run_cli("codestore", *args, env=dict(os.environ, CODESTORE_ORG=ORG, **{var: value}))
        assert "internal error" not in proc.stderr and _no_escapes(proc.stdout + proc.stderr), (args, proc)
        if args != ("doctor",):
            assert proc.returncode == 1 and says in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)


@pytest.mark.parametrize("text, says", [
    ('[orgs."../../evil"]\nkid = "k"\n', "a section's name is an org name"),
    ('[orgs."p\\u001b]0;T\\u0007Q"]\nkid = "k"\n', "a section's name is an org name"),
    ('org = "acme"\n[repos."team/\\u001b[31m*"]\nscopes = "git:read"\n', "must be printable text"),
])
def test_a_config_file_name_that_would_be_a_path_or_an_escape_is_refused(tmp_path: Path, text: str, says: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    proc = run_cli("codestore", "config", "show", env=dict(os.environ, CODESTORE_CONFIG=str(cfg)))
    assert proc.returncode == 1 and says in proc.stderr and _no_escapes(proc.stderr), proc.stderr


def test_a_token_cut_short_by_a_message_is_still_redacted() -> None:
    # `codestore token "team/$TOKEN"` printed the token's header and claims: the id was cut
    # before redaction, and the JWT pattern wanted two dots.
    cut = "'team/eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJhY21lIiwic3ViIjoi...' is not a repository id"
    assert "eyJ" not in redact(cut) and "is not a repository id" in redact(cut)
    assert "eyJ" not in redact("eyJa.b.c") and redact("keyJoe and eyJ") == "keyJoe and eyJ"


def test_a_bad_github_token_url_is_one_line_not_a_crash() -> None:
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": "http://[::1/", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "x"}
    with pytest.raises(ConfigError, match="ACTIONS_ID_TOKEN_REQUEST_URL is not an http"):
        workload.github_token(env, "aud")


def test_the_credential_helper_exits_0_with_quit_for_a_bad_agent_url_of_any_form(org_key: OrgKey) -> None:
    for url in ("http://127.0.0.1:99999", "http://u:p@127.0.0.1:1", "http://[::1"):
        proc = run_cli("git-credential-codestore", "get", input=f"protocol=https\nhost={ORG}.code.storage\npath=team/app.git\n\n",
                       env=dict(os.environ, CODESTORE_AGENT_URL=url))
        assert proc.returncode == 0 and proc.stdout == "quit=1\n", (url, proc)


def test_a_crash_log_is_private_like_all_state(tmp_path: Path) -> None:
    from git_credential_codestore.errors import boundary, crash_log_path

    def bug() -> int:
        raise RuntimeError("a bug")

    with open(os.devnull, "w") as quiet:
        assert boundary("codestore", bug, quiet) == 3
    assert (os.stat(crash_log_path()).st_mode & 0o777) == 0o600


def _bounded(call: Callable[[], object], seconds: float = 10) -> object:
    """call() in a thread the test waits for at most `seconds`: a hang fails the test, not the run."""
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{call} waited on a pipe"
    return outcome[0]


def test_a_pipe_where_codestore_keeps_its_own_files_never_holds_it(tmp_path: Path, org_key: OrgKey) -> None:
    # The crash log, the parsed-config cache and the background agent's log are codestore's
    # own files; a named pipe in their place held the process in open(2) for ever.
    from git_credential_codestore import config, config_cache
    from git_credential_codestore.agent.server import default_state_dir
    from git_credential_codestore.errors import boundary, crash_log_path

    def bug() -> int:
        raise RuntimeError("a bug")

    os.makedirs(os.path.dirname(crash_log_path()), exist_ok=True)
    os.mkfifo(crash_log_path())
    with open(os.devnull, "w") as quiet:
        assert _bounded(lambda: boundary("codestore", bug, quiet)) == 3

    (tmp_path / "config.toml").write_text('org = "acme"\n')
    env = dict(os.environ, CODESTORE_CONFIG=str(tmp_path / "config.toml"))
    cache = config_cache.cache_path(env["CODESTORE_CONFIG"], env)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.mkfifo(cache)
    assert _bounded(lambda: config.load(env).org) == "acme"  # parsed again, as for a damaged cache

    log = os.path.join(default_state_dir(), "agent.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    os.mkfifo(log)
    proc = run_cli("codestore", "agent", "start", timeout=30)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and log in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--org", "../x"], "is not an org name"),
    (["--org", "acme\x1b[31m"], "is not an org name"),
    (["--trust-key", "pub.pem:k\x1b]0;X\x07"], "the kid must be printable"),
])
def test_dev_server_names_that_are_printed_or_checked_in_tokens_are_refused(org_key: OrgKey, tmp_path: Path, args: list[str], says: str) -> None:
    proc = subprocess.run([os.path.join(BIN, "codestore"), "dev-server", "--port", "0", "--data-dir", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and says in proc.stderr and _no_escapes(proc.stderr), proc.stderr


@pytest.mark.parametrize("option", ["--audit-log", "--store", "--tls-cert"])
def test_the_agent_named_a_pipe_for_a_file_says_so_instead_of_waiting_forever(org_key: OrgKey, tmp_path: Path, option: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    extra = [option, str(fifo)] + (["--tls-key", str(fifo), "--listen", "127.0.0.1:0"] if option == "--tls-cert" else [])
    proc = subprocess.run([os.path.join(BIN, "codestore"), "agent", "serve", "--state-dir", str(tmp_path / "st"),
                           "--socket", str(tmp_path / "s" / "a.sock"), *extra], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode in (1, 2) and proc.stderr.count("\n") == 1 and str(fifo) in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["--trust-key", "FIFO:k1"], ["--trust-key", "/dev/zero:k1"], ["--log", "FIFO"]])
def test_the_dev_server_named_a_pipe_or_an_endless_file_says_so(org_key: OrgKey, tmp_path: Path, args: list[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [a.replace("FIFO", str(fifo)) for a in args]
    proc = subprocess.run([os.path.join(BIN, "codestore"), "dev-server", "--port", "0", "--data-dir", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
