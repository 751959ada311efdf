"""git-remote-codestore without a server: URL parsing, the protocol preamble, the child's env.

`run()` is driven with in-memory streams; where a transport is needed, a fake one (a small
Python program that answers like `git remote-https`) shows what it was given.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from git_credential_codestore import config, remotes
from git_credential_codestore.errors import ConfigError
from git_credential_codestore.secrets import Token
from remote_helper import main as helper
from remote_helper import protocol, transport
from tests.conftest import OrgKey
from tests.leakscan import secrets_in_text

CAPS = b"\n".join(protocol.CAPABILITIES) + b"\n\n"


def cfg(**kw: object) -> config.Config:
    return config.Config(**kw)


def trusting(url: str) -> config.Config:
    """Org acme, with an explicit http(s) URL's own server configured as the base URL."""
    if url.startswith(("http://", "https://")):
        scheme, _, rest = url.partition("://")
        return cfg(org="acme", base_url_setting=f"{scheme}://{rest.split('/', 1)[0]}")
    return cfg(org="acme")


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "repo", "ephemeral", "https_url"),
    [
        ("codestore://acme/app", "app", False, "https://acme.code.storage/app.git"),
        ("codestore://acme/app.git", "app", False, "https://acme.code.storage/app.git"),
        ("codestore://acme/team/app", "team/app", False, "https://acme.code.storage/team/app.git"),
        ("codestore://acme/team/app+ephemeral", "team/app", True, "https://acme.code.storage/team/app+ephemeral.git"),
        ("codestore://acme/app+ephemeral.git", "app", True, "https://acme.code.storage/app+ephemeral.git"),
        ("acme/team/app", "team/app", False, "https://acme.code.storage/team/app.git"),
        ("acme/app/", "app", False, "https://acme.code.storage/app.git"),
        ("https://git.example.com/team/app.git", "team/app", False, "https://git.example.com/team/app.git"),
        ("https://git.example.com/app+ephemeral.git", "app", True, "https://git.example.com/app+ephemeral.git"),
        ("http://127.0.0.1:8080/app.git", "app", False, "http://127.0.0.1:8080/app.git"),
        ("http://localhost:8080/a/b.git", "a/b", False, "http://localhost:8080/a/b.git"),
        ("http://[::1]:8080/app.git", "app", False, "http://[::1]:8080/app.git"),
    ],
)
def test_urls_name_a_repository_namespace_and_endpoint(url: str, repo: str, ephemeral: bool, https_url: str) -> None:
    remote, _ = remotes.parse(url, trusting(url))
    assert (remote.repo, remote.ephemeral, remote.https_url) == (repo, ephemeral, https_url)


@pytest.mark.parametrize(
    ("url", "configured", "message"),
    [
        # Threat: a URL handed to an agent sending an org token to someone else's server.
        ("https://attacker.example/team/secret.git", {"org": "acme"}, "not the configured server"),
        ("https://acme.code.storage.attacker.example/a.git", {"org": "acme"}, "not the configured server"),
        ("http://127.0.0.1:9999/a.git", {"base_url_setting": "http://127.0.0.1:8080"}, "not the configured server"),
        ("https://acme.code.storage/a.git", {}, "no Code Storage server is configured"),
    ],
)
def test_explicit_urls_get_tokens_only_for_the_configured_server(url: str, configured: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        remotes.parse(url, cfg(**configured))


def test_the_default_base_url_of_the_configured_org_is_trusted() -> None:
    remote, _ = remotes.parse("https://acme.code.storage/team/app.git", cfg(org="acme"))
    assert remote.https_url == "https://acme.code.storage/team/app.git"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "not a codestore URL"),
        ("codestore://", "not a codestore URL"),
        ("codestore://acme", "not a codestore URL"),
        ("codestore://acme/", "not a codestore URL"),
        ("codestore://-acme/app", "not a codestore URL"),
        ("codestore://t:secret@acme/app", "credentials"),
        ("ssh://t:secret@host/app", "not a codestore URL"),
        ("codestore://acme:443/app", "not a host and port"),
        ("codestore://acme/../app", "not a repository id"),
        ("codestore://acme/app?x=1", "no query"),
        ("codestore://acme/a+b", "not a repository id"),
        ("codestore://acme/app name", "not a codestore URL"),
        ("ssh://acme/app", "not a codestore URL"),
        ("https://t:eyJabc@host/app.git", "credentials"),
        ("https://host/app.git?x", "not a repository URL"),
        ("https://host/", "names no repository"),
        ("https://host:99999/app.git", "not a valid URL"),
        # Threat: a token crossing the network in clear text.
        ("http://git.example.com/app.git", "refusing plain http"),
        ("http://10.0.0.1/app.git", "refusing plain http"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        remotes.parse(url, trusting(url))
    assert "secret" not in str(e.value) and "eyJabc" not in str(e.value)


def test_the_configured_org_uses_the_configured_base_url() -> None:
    remote, _ = remotes.parse("codestore://acme/app", cfg(org="acme", base_url_setting="http://127.0.0.1:9/git"))
    assert remote.https_url == "http://127.0.0.1:9/git/app.git"


def test_an_explicit_url_under_the_base_url_drops_its_path_prefix() -> None:
    remote, _ = remotes.parse("http://127.0.0.1:9/git/team/app.git", cfg(org="acme", base_url_setting="http://127.0.0.1:9/git"))
    assert (remote.repo, remote.https_url) == ("team/app", "http://127.0.0.1:9/git/team/app.git")


def test_the_url_supplies_the_org_when_none_is_configured() -> None:
    remote, c = remotes.parse("codestore://acme/app", cfg())
    assert c.org == "acme" and remote.https_url == "https://acme.code.storage/app.git"


def test_another_org_than_the_configured_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="not the configured org"):
        remotes.parse("codestore://other/app", cfg(org="acme"))


# ---------------------------------------------------------------- the preamble


def _real_transport(stdin: bytes) -> bytes:
    # No network: remote-curl answers capabilities and options before it connects.
    return subprocess.run(
        ["git", "remote-https", "origin", "https://example.invalid/x.git"],
        input=stdin, capture_output=True, timeout=30,
    ).stdout


def test_capabilities_are_exactly_those_of_git_remote_https() -> None:
    # Pitfall: a list that differs from the transport's makes clone produce an empty repo, exit 0.
    assert _real_transport(b"capabilities\n\n") == CAPS
    assert b"connect" not in protocol.CAPABILITIES


OPTION_LINES = [
    "verbosity 1", "verbosity x", "verbosity", "progress true", "progress maybe", "progress",
    "depth 1", "depth -1", "depth x", "deepen-since 1700000000", "deepen-not main",
    "deepen-relative true", "deepen-relative x", "followtags true", "dry-run false", "dry-run x",
    "check-connectivity true", "cas refs/heads/main:abc", "force-if-includes true", "force-if-includes x",
    "cloning true", "update-shallow true", "pushcert if-asked", "pushcert x", "atomic true", "atomic x",
    "push-option ci.skip", "family ipv4", "family all", "family x", "from-promisor true", "refetch true",
    "filter blob:none", "object-format true", "object-format sha1", "no-dependents true", "reject-shallow true",
    "bogus value",
]


@pytest.mark.parametrize("line", OPTION_LINES)
def test_option_replies_match_git_remote_https(line: str) -> None:
    expected = _real_transport(f"option {line}\n\n".encode()).strip()
    assert protocol.option_reply(f"option {line}".encode()) == expected


@pytest.mark.parametrize(
    ("command", "operation"),
    [
        (b"list for-push", "push"),
        (b"push refs/heads/main:refs/heads/main", "push"),
        (b"stateless-connect git-receive-pack", "push"),
        (b"stateless-connect git-upload-pack", "read"),
        (b"stateless-connect git-upload-archive", "read"),
        (b"list", "read"),
        (b"fetch 0123 refs/heads/main", "read"),
        (b"get https://example.com/b.bundle /tmp/b", "read"),
        (b"connect git-upload-pack", None),
        (b"export", None),
        (b"frobnicate", None),
    ],
)
def test_the_first_command_decides_the_operation(command: bytes, operation: str | None) -> None:
    assert protocol.classify(command) == operation


def test_a_line_split_across_reads_is_reassembled() -> None:
    chunks = [b"capa", b"bilities\nopt", b"ion progress true\n", b""]
    reader = protocol.LineReader(lambda n: chunks.pop(0))
    assert [reader.readline(), reader.readline(), reader.readline()] == [b"capabilities", b"option progress true", None]


def test_input_cut_in_the_middle_of_a_line_is_an_error() -> None:
    reader = protocol.LineReader(io.BytesIO(b"capabilities\nopt").read)
    reader.readline()
    with pytest.raises(protocol.ProtocolError):
        reader.readline()


# ---------------------------------------------------------------- run() with in-memory streams


def run(stdin: bytes, url: str = "codestore://acme/app", env: Mapping[str, str] | None = None, launch: helper.Launcher | None = None) -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.BytesIO()
    status = helper.run(["origin", url], io.BytesIO(stdin), out, err, env=dict(os.environ if env is None else env), launch=launch)
    return status, out.getvalue(), err.getvalue().decode()


@pytest.mark.parametrize(
    ("stdin", "stdout"),
    [
        (b"", b""),
        (b"\n", b""),
        (b"capabilities\n\n", CAPS),
        (b"capabilities\noption progress true\noption verbosity 1\n\n", CAPS + b"ok\nok\n"),
        (b"capabilities\noption bogus 1\noption depth x\n", CAPS + b"unsupported\nerror invalid value\n"),
    ],
)
def test_the_preamble_is_answered_without_a_key_or_a_server(stdin: bytes, stdout: bytes) -> None:
    # No key is configured here: a session that ends before a real command needs none.
    status, out, err = run(stdin, env={**os.environ, "CODESTORE_ORG": "acme"})
    assert (status, out, err) == (0, stdout, "")


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"capabilities\nconnect git-upload-pack\n", "'connect', which codestore does not serve"),
        (b"capabilities\nexport\n", "'export'"),
    ],
)
def test_unknown_commands_fail_with_one_line(stdin: bytes, message: str) -> None:
    status, _, err = run(stdin, env={**os.environ, "CODESTORE_ORG": "acme"})
    assert status == 1 and message in err and err.count("\n") == 1 and err.startswith("codestore: ")


def test_a_read_without_a_key_says_how_to_provide_one(tmp_path: Path) -> None:
    env = {**os.environ, "CODESTORE_ORG": "acme"}
    status, out, err = run(b"capabilities\nstateless-connect git-upload-pack\n", env=env)
    assert status == 1 and out == CAPS
    assert err.startswith("codestore: ") and err.count("\n") == 1 and "codestore key" in err


def test_a_bad_url_fails_before_reading_anything() -> None:
    status, out, err = run(b"capabilities\n\n", url="codestore://acme", env={**os.environ, "CODESTORE_ORG": "acme"})
    assert (status, out) == (1, b"") and err.startswith("codestore: 'acme' is not a codestore URL")


def test_wrong_arguments_print_usage() -> None:
    err = io.BytesIO()
    assert helper.run([], io.BytesIO(), io.BytesIO(), err) == 2
    assert b"usage: git-remote-codestore <remote> <url>" in err.getvalue()


@pytest.mark.parametrize(
    ("url", "env_scopes", "message"),
    [
        ("codestore://acme/app", {}, 'CODESTORE_SCOPES="git:read git:write"'),
        ("codestore://acme/app", {}, "push to codestore://acme/app+ephemeral instead"),
        ("codestore://acme/app+ephemeral", {"CODESTORE_SCOPES": "git:read"}, "CODESTORE_EPHEMERAL_SCOPES"),
        (
            "codestore://acme/app",
            {"CODESTORE_SCOPES": "git:read", "CODESTORE_EPHEMERAL_SCOPES": "git:read git:write"},
            "configuration forbids writing to app in the default namespace",
        ),
    ],
)
def test_a_push_that_configuration_forbids_is_refused_before_minting(
    org_key: OrgKey, url: str, env_scopes: dict[str, str], message: str
) -> None:
    launched: list[object] = []

    def launch(argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int]) -> transport.Child:
        launched.append(argv)
        raise AssertionError("the transport must not start")

    status, _, err = run(b"capabilities\nlist for-push\n", url=url, env={**os.environ, **env_scopes}, launch=launch)
    assert status == 1 and message in err and err.count("\n") == 1 and not launched


def test_a_push_the_named_agent_cannot_decide_falls_back_to_the_local_key_within_configuration(
    org_key: OrgKey, tmp_path: Path
) -> None:
    # Threat: the owner's agent being down turning a narrow request ("at most git:write")
    # into a write token the configuration forbids, signed by the local key.
    def launch(argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int]) -> transport.Child:
        raise AssertionError("the transport must not start")

    env = {**os.environ, "CODESTORE_AGENT_SOCK": str(tmp_path / "no-agent.sock")}
    status, _, err = run(b"capabilities\nlist for-push\n", url="codestore://acme/app", env=env, launch=launch)
    assert status == 1 and err.count("\n") == 1
    assert err.startswith("codestore: configuration forbids writing to app in the default namespace"), err


FAKE_TRANSPORT = r"""
import os, sys
from remote_helper import protocol
out = sys.stdout.buffer
import subprocess
# As git-remote-https does: read all configuration before the first command.
HEADER = subprocess.run(["git", "config", "--get-urlmatch", "http.extraheader", sys.argv[2]], capture_output=True, close_fds=False).stdout.strip()
for line in sys.stdin.buffer:
    line = line.rstrip(b"\n")
    mode = os.environ.get("FAKE_MODE", "")
    if line == b"capabilities":
        caps = [c for c in protocol.CAPABILITIES if mode != "old-git" or c != b"get"]
        out.write(b"\n".join(caps) + b"\n\n")
    elif line.startswith(b"option "):
        out.write((mode.encode() if mode in ("ok", "unsupported") else protocol.option_reply(line)) + b"\n")
    else:
        # Read only now, after the first answer, as git would not: codestore has emptied
        # the private configuration by then, so this sees nothing.
        import subprocess
        late = subprocess.run(["git", "config", "--get-urlmatch", "http.extraheader", sys.argv[2]], capture_output=True, close_fds=False)
        out.write(b"command " + line + b"\n")
        out.write(b"argv " + " ".join(sys.argv[1:]).encode() + b"\n")
        out.write(b"header " + HEADER.split()[-1] + b"\n")
        out.write(b"late " + late.stdout.strip() + b"\n")
        out.write(b"params " + os.environ["GIT_CONFIG_PARAMETERS"].encode() + b"\n")
        out.flush()
        out.write(b"rest " + sys.stdin.buffer.read() + b"\n")
        break
out.flush()
sys.stderr.write("fatal: unable to access 'x': The requested URL returned error: 401\n")
sys.exit(7)
"""


def fake_launcher(seen: list[Sequence[str]]) -> helper.Launcher:
    def launch(argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int]) -> transport.Child:
        seen.append(argv)
        return transport.spawn([sys.executable, "-c", FAKE_TRANSPORT, *argv[-2:]], env, pass_fds)

    return launch


def test_replay_is_swallowed_and_everything_after_it_passes_through(org_key: OrgKey) -> None:
    seen: list[Sequence[str]] = []
    stdin = b"capabilities\noption progress true\noption bogus x\nlist\ntrailing bytes"
    status, out, err = run(stdin, launch=fake_launcher(seen))
    lines = out.split(b"\n")
    # git saw our preamble once, then exactly what the transport said after it.
    assert out.startswith(CAPS + b"ok\nunsupported\ncommand list\n")
    assert b"argv origin https://acme.code.storage/app.git" in lines
    # The header came through a file included last; later readers find it emptied.
    assert any(line.startswith(b"params 'include.path'='/dev/fd/") for line in lines), lines
    assert b"late " in lines
    assert b"rest trailing bytes" in lines
    assert status == 7
    assert "returned error: 401" in err and "codestore: the server rejected the token (HTTP 401)" in err
    assert "fatal:" not in err  # git's line is in ours: one line, not two saying one thing
    # Threat: the token in argv, where every process on the machine can read it.
    assert not secrets_in_text(" ".join(seen[0]))


def test_the_transport_receives_the_token_as_a_basic_header(org_key: OrgKey) -> None:
    import base64

    _, out, _ = run(b"capabilities\nstateless-connect git-upload-pack\n", launch=fake_launcher([]))
    header = next(line for line in out.split(b"\n") if line.startswith(b"header "))
    user, _, jwt = base64.b64decode(header.split()[1]).decode().partition(":")
    assert user == "t" and jwt.startswith("eyJ")


def test_a_url_given_as_the_remote_name_is_replaced_by_the_https_url(org_key: OrgKey) -> None:
    seen: list[Sequence[str]] = []
    out, err = io.BytesIO(), io.BytesIO()
    url = "codestore://acme/app"
    helper.run([url, url], io.BytesIO(b"list\n"), out, err, launch=fake_launcher(seen))
    assert seen[0][-2:] == ["https://acme.code.storage/app.git", "https://acme.code.storage/app.git"]


# ---------------------------------------------------------------- the transport's environment

TOKEN = Token("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", 0)


def _git_config(env: Mapping[str, str], key: str, fds: Sequence[int] = ()) -> list[str]:
    proc = subprocess.run(["git", "config", "--get-all", key], env=dict(env), capture_output=True, text=True, pass_fds=fds)
    return proc.stdout.splitlines()


def _private(url: str = "https://acme.code.storage/app.git") -> transport.PrivateConfig:
    return transport.PrivateConfig(transport.token_config(TOKEN, url, "origin"))


def test_child_env_keeps_existing_command_line_config_and_adds_the_header_for_the_url() -> None:
    private = _private()
    env = transport.child_env(
        {**os.environ, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "a.b", "GIT_CONFIG_VALUE_0": "c",
         "GIT_CONFIG_PARAMETERS": "'x.y'='it'\\''s'"},
        private,
    )
    assert _git_config(env, "a.b") == ["c"] and _git_config(env, "x.y") == ["it's"]
    header = _git_config(env, "http.https://acme.code.storage/app.git.extraheader", private.pass_fds)
    assert len(header) == 1 and header[0].startswith("Authorization: Basic ")
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_ASKPASS"] == ""
    # Threat: the token in the environment that the transport's children inherit and trace2 reports.
    assert not secrets_in_text(repr(env)) and TOKEN.reveal() not in repr(env)
    private.forget()


def test_the_private_configuration_is_empty_once_forgotten() -> None:
    private = _private()
    env = transport.child_env(os.environ, private)
    fds = private.pass_fds
    assert _git_config(env, "http.followredirects", fds) == ["false"]
    private.forget()
    private.forget()  # idempotent
    assert _git_config(env, "http.followredirects", fds) == []


def test_git_dash_c_cannot_turn_redirects_or_helpers_back_on() -> None:
    # Threat: `git -c http.<url>.followRedirects=true` (more specific than any plain key)
    # or a -c helper sending the header elsewhere.
    url = "https://acme.code.storage/app.git"
    user = f"'http.{url}.followRedirects'='true' 'http.{url}/.followRedirects'='true' 'credential.helper'='store'"
    private = _private(url)
    env = transport.child_env({**os.environ, "GIT_CONFIG_PARAMETERS": user}, private)
    got = subprocess.run(["git", "config", "--get-urlmatch", "http.followredirects", url], env=env, capture_output=True, text=True,
                         pass_fds=private.pass_fds)
    assert got.stdout == "false\n"
    assert _git_config(env, "credential.helper", private.pass_fds)[-1] == ""
    private.forget()


def test_the_transport_argv_never_holds_the_token() -> None:
    argv = transport.transport_argv("origin", "https://acme.code.storage/app.git", {})
    assert argv == ["git", "remote-https", "origin", "https://acme.code.storage/app.git"]
    assert transport.transport_argv("o", "http://127.0.0.1:1/a.git", {})[1] == "remote-http"


@pytest.mark.parametrize(
    ("stderr", "hint"),
    [
        (b"fatal: could not read Username for 'https://h': terminal prompts disabled\n", "HTTP 401"),
        (b"fatal: unable to access 'u': The requested URL returned error: 403\n", "HTTP 403"),
        (b"fatal: repository 'u' not found\n", "was not found"),
        (b"fatal: unable to access 'u': Failed to connect to h port 1: Connection refused\n", "cannot reach"),
        (b"fatal: unable to access 'u': Could not resolve host: h\n", "cannot reach"),
        (b"fatal: unable to update url base from redirection\n", "redirect"),
        (b"remote: repository 'x' does not exist\nfatal: repository 'u' not found\n", None),
        (b"error: failed to push some refs\n", None),
    ],
)
def test_transport_failures_get_one_hint_line(stderr: bytes, hint: str | None) -> None:
    got = transport.hint_for(stderr)
    assert (got is None) if hint is None else (got is not None and hint in got)


@pytest.mark.parametrize(
    ("mode", "stdin", "status", "message"),
    [
        # A newer transport taking an option we called unsupported: git just does not use it.
        ("ok", b"capabilities\noption bogus 1\nlist\n", 7, ""),
        # The reverse would silently drop a setting git believes is in force.
        ("unsupported", b"capabilities\noption depth 1\nlist\n", 1, "answered option 'depth' differently"),
        ("old-git", b"capabilities\nlist\n", 1, "lacks capabilities codestore announced (get)"),
    ],
)
def test_a_transport_that_disagrees_with_our_preamble_is_caught(
    org_key: OrgKey, mode: str, stdin: bytes, status: int, message: str
) -> None:
    got, _, err = run(stdin, env={**os.environ, "FAKE_MODE": mode}, launch=fake_launcher([]))
    assert got == status and message in err


def test_a_transport_that_cannot_start_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    for argv, env in ((["git-no-such-transport", "origin", "x"], {"PATH": str(tmp_path)}),
                      ([str(tmp_path / "missing"), "origin", "x"], {})):
        with pytest.raises(ConfigError, match="cannot run git's HTTPS transport .*is git 2.39 or newer installed"):
            transport.spawn(argv, env)


def test_the_spawned_transport_gets_its_pipes_and_its_exit_status() -> None:
    child = transport.spawn([sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper());"
                             "sys.stderr.write('e'); sys.exit(3)"], dict(os.environ))
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    child.stdin.write(b"abc")
    child.stdin.close()
    assert child.stdout.read() == b"ABC" and child.stderr.read() == b"e"
    assert child.wait() == 3
    child.stdout.close()
    child.stderr.close()


def test_a_401_after_the_token_ran_out_is_named_as_such() -> None:
    tail = b"error: RPC failed; HTTP 401 curl 22 The requested URL returned error: 401\n"
    assert "HTTP 401" in (transport.hint_for(tail) or "")
    hint = transport.hint_for(tail, expired=True) or ""
    assert "the token expired during the push" in hint and "clock" not in hint


@pytest.mark.parametrize(
    ("after", "operation", "command", "options"),
    [
        (b"", "end", b"", []),  # nothing to push: git ends the session
        (b"\n", "end", b"", []),
        (b"option atomic true\noption push-option x\npush refs/heads/a:refs/heads/a\npush :refs/heads/b\n\n", "push",
         b"push refs/heads/a:refs/heads/a\npush :refs/heads/b\n", [b"option atomic true", b"option push-option x"]),
    ],
)
def test_after_the_advertisement_options_are_answered_and_the_push_batch_is_kept_whole(
    after: bytes, operation: str, command: bytes, options: list[bytes]
) -> None:
    first = protocol.negotiate(protocol.LineReader(io.BytesIO(b"capabilities\nlist for-push\n").read), lambda b: None)
    written: list[bytes] = []
    push = protocol.after_advertisement(protocol.LineReader(io.BytesIO(after).read), written.append, first)
    assert (push.operation, push.command) == (operation, command)
    assert [line for line, _ in push.replay] == [b"capabilities", *options]
    assert written == [b"ok\n"] * len(options)


def test_anything_but_push_commands_after_the_advertisement_is_refused() -> None:
    first = protocol.negotiate(protocol.LineReader(io.BytesIO(b"list for-push\n").read), lambda b: None)
    with pytest.raises(protocol.ProtocolError, match="'fetch' after the push advertisement"):
        protocol.after_advertisement(protocol.LineReader(io.BytesIO(b"fetch a b\n").read), lambda b: None, first)


def test_the_stderr_tee_holds_only_gits_last_words_on_an_http_failure_and_passes_the_rest_at_once() -> None:
    import threading

    r, w = os.pipe()
    got = io.BytesIO()
    arrived = threading.Event()

    class Sink(io.BytesIO):
        def write(self, data: Any) -> int:
            n = got.write(data)
            arrived.set()
            return n

    tee = transport.StderrTee(os.fdopen(r, "rb", buffering=0), transport.Endpoint(Sink()))
    tee.thread.start()

    def say(data: bytes) -> bytes:
        arrived.clear()
        os.write(w, data)
        assert arrived.wait(5)
        return got.getvalue()

    assert say(b"Receiving objects:  10% (1/10)\r") == b"Receiving objects:  10% (1/10)\r"  # no newline yet: at once
    assert say(b"remote: hello\nfatal: unable").endswith(b"remote: hello\n")  # what may be held waits for its end
    os.write(w, b" to access 'https://h/x.git/': Could not resolve host: h\nerror: some")
    os.write(w, b"thing else\nfatal: another failure\n")
    os.close(w)
    tee.thread.join(5)
    assert got.getvalue() == b"Receiving objects:  10% (1/10)\rremote: hello\nerror: something else\nfatal: another failure\n"
    assert tee.held == [b"fatal: unable to access 'https://h/x.git/': Could not resolve host: h\n"]
    assert tee.reason() == "Could not resolve host: h"
