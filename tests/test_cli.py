"""The codestore CLI: demo, doctor, token, repo, config; errors are one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from tests.conftest import KID, ORG, DevServer, OrgKey, run_cli
from tests.realparts import serve_in_thread


def test_demo_runs_the_whole_flow_offline_and_leaves_the_users_config_alone(hermetic: Path) -> None:
    before = sorted(p.name for p in hermetic.rglob("*"))
    proc = run_cli("codestore", "demo", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "none found" in proc.stdout and "200 POST git-receive-pack" in proc.stdout
    assert sorted(p.name for p in hermetic.rglob("*")) == before


def test_doctor_passes_on_a_set_up_machine(dev_server: DevServer) -> None:
    run_cli("codestore", "setup")
    proc = run_cli("codestore", "doctor")
    assert proc.returncode == 0, proc.stdout
    marks = {line.split(":")[0].split(None, 1)[1]: line.split()[0] for line in proc.stdout.splitlines()}
    # git older than 2.41 ignores password_expiry_utc: a warning, not a failure.
    assert marks == {"config": "ok", "key": "ok", "git": marks["git"], "git setup": "ok", "server": "ok"}
    assert marks["git"] in ("ok", "warn")


def test_doctor_names_the_fix_for_each_failure(hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    monkeypatch.setenv("CODESTORE_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    proc = run_cli("codestore", "doctor")
    assert proc.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in proc.stdout.splitlines()}
    assert "codestore key generate" in lines["key"]
    assert "codestore setup" in proc.stdout
    assert "unreachable" in lines["server"]


def test_doctor_says_a_named_agent_decides_the_scopes_not_local_settings(hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    monkeypatch.setenv("CODESTORE_AGENT_SOCK", str(hermetic / "grant.sock"))  # a mounted grant socket
    proc = run_cli("codestore", "doctor")
    config_line = next(line for line in proc.stdout.splitlines() if line.split()[1] == "config:")
    assert "scopes decided by the agent" in config_line and "git:read" not in config_line


def test_doctor_without_any_configuration_says_to_set_the_org(hermetic: Path) -> None:
    proc = run_cli("codestore", "doctor")
    assert proc.returncode == 1 and "CODESTORE_ORG" in proc.stdout


def test_token_prints_one_scoped_short_lived_token(org_key: OrgKey) -> None:
    proc = run_cli("codestore", "token", "team/app", "--scope", "git:write", "--ttl", "120")
    assert proc.returncode == 0, proc.stderr
    claims = jwt.decode(proc.stdout.strip(), options={"verify_signature": False})
    assert claims["repo"] == "team/app" and claims["scopes"] == ["git:read", "git:write"]
    assert claims["exp"] - claims["iat"] == 120


@pytest.mark.parametrize(
    "args,fragment,code",
    [
        (["token", "../x"], "not a repository id", 1),
        (["config", "set", "private_key", "x"], "key import", 1),
        (["config", "set", "nonsense", "x"], "unknown setting", 1),
        # A command line that cannot run as given: a usage error, exit 2, as click's own.
        (["token", "a", "--ttl", "99999"], "'--ttl': 99999 is not in the range 30<=x<=3600", 2),
        (["token", "a", "--ttl", "0"], "'--ttl': 0 is not in the range", 2),  # was: silently the default 300
        (["token", "a", "--scope", "root"], "'--scope': 'root' is not one of", 2),
        (["audit", "--since", "garbage"], "'--since': --since takes a UTC time", 2),
        (["audit", "--until", "999999999999999999999999s"], "'--until': --until takes a UTC time", 2),  # was: exit 3
        (["audit", "--repo", "team/\x1b[2Japp"], "'--repo': --repo takes text without control characters", 2),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(org_key: OrgKey, args: list[str], fragment: str, code: int) -> None:
    proc = run_cli("codestore", *args)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("codestore: ") and proc.stderr.count("\n") == 1
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_repo_create_then_list_through_the_rest_api(dev_server: DevServer) -> None:
    proc = run_cli("codestore", "repo", "create", "team/new")
    assert proc.returncode == 0, proc.stderr
    assert f"{dev_server.url}/team/new.git" in proc.stdout
    again = run_cli("codestore", "repo", "create", "team/new")
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = run_cli("codestore", "repo", "list")
    assert "team/new" in listed.stdout


def test_unreachable_api_is_one_line(org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_BASE_URL", "http://127.0.0.1:9")
    proc = run_cli("codestore", "repo", "create", "x")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "cannot reach" in proc.stderr


def test_config_set_then_show(hermetic: Path) -> None:
    assert run_cli("codestore", "config", "set", "org", "acme").returncode == 0
    assert run_cli("codestore", "config", "set", "scopes", "git:write").returncode == 0
    shown = run_cli("codestore", "config", "show").stdout
    assert "org:      acme" in shown and "git:read git:write" in shown


def test_rest_calls_never_follow_a_redirect_with_the_token(org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat: a redirect from the API origin carrying the Bearer token to another host.
    import http.server

    received: list[str] = []

    class Capture(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            received.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    capture = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    target = f"http://localhost:{capture.server_address[1]}"

    class Redirect(Capture):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.end_headers()

        do_POST = do_GET

    redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    servers = [capture, redirector]
    for s in servers:
        serve_in_thread(s)
    try:
        monkeypatch.setenv("CODESTORE_BASE_URL", f"http://127.0.0.1:{redirector.server_address[1]}")
        proc = run_cli("codestore", "repo", "create", "team/app")
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "redirected" in proc.stderr
        assert received == []
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def _text_options() -> list[tuple[list[str], str]]:
    """(command path, option) of every option of every command that takes text or a path."""
    import click

    from git_credential_codestore.cli import cli

    found: list[tuple[list[str], str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag and param.type.name in ("text", "path", "directory", "file"):
                found.append((path, param.opts[0]))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(cli, [])
    return found


def test_every_text_option_refuses_an_empty_value_instead_of_taking_it_as_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    # Threat (a limit silently dropped): `grant create --expires-in "$TTL" --ref-policy "$RULES"`
    # with the variables unset made a grant that never ends and has no ref rules, because
    # each command read an empty value as "not given". Walked from the command tree, so an
    # option added later is held to it too.
    from git_credential_codestore.cli import main

    options = _text_options()
    assert {("grant", "create", "--expires-in"), ("grant", "create", "--ref-policy"), ("grant", "list", "--sub"),
            ("agent", "serve", "--store"), ("trust", "add", "--ref-policy")} <= {(*p, o) for p, o in options}
    for path, option in options:
        for empty in ("", "  "):
            code = main([*path, option, empty])
            err = capsys.readouterr().err
            assert code == 2 and f"'{option}': is empty" in err and err.count("\n") == 1, (path, option, err)


def test_an_age_older_than_1970_is_the_whole_trail_not_a_crash() -> None:
    # `--since 99999999999999d` crashed (gmtime's OverflowError, exit 3), `--since 800000d`
    # sent the agent a year before 0, which it refused quoting a date nobody typed.
    from git_credential_codestore.audit import parse_time

    for age in ("99999999999999d", "800000d", "999999999999999999s"):
        assert parse_time(age, "--since") == "1970-01-01T00:00:00Z"
    assert parse_time("0s", "--since") > "2026"


def test_a_listing_of_many_pages_renews_its_token_before_it_expires(dev_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # `codestore branch list` minted one 60 s token for every page: a repository with 20k
    # branches (any sandbox with write access can push them) outlived it, and the listing
    # failed half-way with "token expired 31s ago". Both listings (branches, repositories)
    # page through api._pages; here pages are 2 repositories and every token "about to
    # expire", so each page asks for a new one, and the real server checks each.
    from git_credential_codestore import api, keys, tokens
    from git_credential_codestore.secrets import Token

    monkeypatch.setattr(api, "PAGE_LIMIT", 2)
    monkeypatch.setattr(api, "RENEW_BEFORE", 3600)
    for n in range(5):
        dev_server.create_repo(f"team/r{n}")
    key = keys.parse_private_key(keys.Secret(dev_server.key.pem), "test")
    minted: list[Token] = []

    def mint() -> Token:
        minted.append(tokens.mint(key, org=ORG, repo="org", scopes=["org:read"], ttl=60, sub="test", kid=KID))
        return minted[-1]

    listed = api.list_repos(dev_server.url, mint)
    assert sorted(str(r["repo_id"]) for r in listed) == [f"team/r{n}" for n in range(5)]
    assert len(minted) == 4 and len({t.reveal() for t in minted}) == 4  # the first, then one for each of 3 pages
