"""git-credential-codestore: git's credential protocol, as git itself drives it."""

from __future__ import annotations

import io
import os
import subprocess
import time

import jwt
import pytest

from git_credential_codestore import credential
from tests.conftest import BIN, KID, ORG, OrgKey, git

HOST = f"{ORG}.code.storage"


def ask(operation: str, text: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.BytesIO()
    status = credential.run([operation], io.BytesIO(text.encode()), out, err, env if env is not None else dict(os.environ))
    return status, out.getvalue().decode(), err.getvalue().decode()


def reply_fields(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if line)


def claims(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


def test_get_answers_with_a_fresh_token_for_the_repository_in_path(org_key: OrgKey) -> None:
    status, out, err = ask("get", f"protocol=https\nhost={HOST}\npath=team/app.git\n\n")
    fields = reply_fields(out)
    assert (status, err) == (0, "")
    assert fields["username"] == "t"
    c = claims(fields["password"])
    assert c["repo"] == "team/app" and c["iss"] == ORG and c["scopes"] == ["git:read"]
    assert int(fields["password_expiry_utc"]) == c["exp"]
    assert 0 < c["exp"] - time.time() <= 300
    assert jwt.get_unverified_header(fields["password"])["kid"] == KID


def test_get_for_the_ephemeral_namespace_names_the_plain_repository(org_key: OrgKey) -> None:
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=team/app+ephemeral.git\n\n")
    assert claims(reply_fields(out)["password"])["repo"] == "team/app"


def test_get_mints_read_only_unless_configuration_grants_write(org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat: a sandbox that only clones holding a token that can push.
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=a.git\n\n")
    assert claims(reply_fields(out)["password"])["scopes"] == ["git:read"]
    monkeypatch.setenv("CODESTORE_EPHEMERAL_SCOPES", "git:read git:write")
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=a.git\n\n")
    assert claims(reply_fields(out)["password"])["scopes"] == ["git:read"]
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=a+ephemeral.git\n\n")
    assert claims(reply_fields(out)["password"])["scopes"] == ["git:read", "git:write"]


def test_per_repository_rules_grant_write_to_matching_repositories_only(org_key: OrgKey, hermetic, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = hermetic / "codestore.toml"
    cfg.write_text('[repos."team/*"]\nscopes = "git:write"\n')
    monkeypatch.setenv("CODESTORE_CONFIG", str(cfg))
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=team/app.git\n\n")
    assert claims(reply_fields(out)["password"])["scopes"] == ["git:read", "git:write"]
    _, out, _ = ask("get", f"protocol=https\nhost={HOST}\npath=other/app.git\n\n")
    assert claims(reply_fields(out)["password"])["scopes"] == ["git:read"]


@pytest.mark.parametrize(
    "request_text",
    [
        "protocol=https\nhost=github.com\npath=a/b.git\n\n",
        f"protocol=http\nhost={HOST}\npath=a/b.git\n\n",  # same host, other scheme
        f"protocol=https\nhost={HOST}:8443\npath=a/b.git\n\n",  # same host, other port
        f"protocol=https\nhost=evil.{HOST}\npath=a/b.git\n\n",
        "protocol=https\n\n",
        "",
    ],
)
def test_get_prints_nothing_for_foreign_hosts(org_key: OrgKey, request_text: str) -> None:
    # Threat: handing an org token to any other server git talks to.
    assert ask("get", request_text) == (0, "", "")


def test_get_without_a_configured_org_stays_silent(hermetic) -> None:
    assert ask("get", f"protocol=https\nhost={HOST}\npath=a.git\n\n") == (0, "", "")


def test_get_without_path_says_to_enable_use_http_path_and_stops_git(org_key: OrgKey) -> None:
    status, out, err = ask("get", f"protocol=https\nhost={HOST}\n\n")
    assert out == "quit=1\n"
    assert err.count("\n") == 1 and "useHttpPath" in err and "codestore setup" in err


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../b.git", "-x.git", "a//b.git", "a b.git", ".git"])
def test_get_refuses_paths_that_name_no_repository(org_key: OrgKey, path: str) -> None:
    status, out, err = ask("get", f"protocol=https\nhost={HOST}\npath={path}\n\n")
    assert out == "quit=1\n" and "password" not in out
    assert err.startswith("git-credential-codestore: ") and err.count("\n") == 1


def test_get_without_a_key_explains_how_to_provide_one_and_stops_git(hermetic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    status, out, err = ask("get", f"protocol=https\nhost={HOST}\npath=a.git\n\n")
    assert out == "quit=1\n"
    assert "codestore key generate" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"no equals sign\n\n",
        b"\xff\xfe\n",
        b"=value-without-key\n",
        b"protocol=https\x00\n",
        b"x=" + b"a" * (credential.MAX_INPUT + 10),
    ],
)
def test_malformed_input_gets_one_line_and_no_traceback(org_key: OrgKey, garbage: bytes) -> None:
    # An expected failure like any other (README: `quit=1`, exit 0); it exited 1 with no answer.
    out, err = io.BytesIO(), io.BytesIO()
    status = credential.run(["get"], io.BytesIO(garbage), out, err, dict(os.environ))
    assert status == 0 and out.getvalue() == b"quit=1\n"
    assert err.getvalue().count(b"\n") == 1 and b"Traceback" not in err.getvalue()
    out, err = io.BytesIO(), io.BytesIO()
    assert credential.run(["erase"], io.BytesIO(garbage), out, err, dict(os.environ)) == 0 and out.getvalue() == b""


def test_malformed_input_errors_never_quote_the_values(org_key: OrgKey) -> None:
    # Threat: a helper echoing a password it was handed into git's terminal output.
    _, _, err = ask("get", "password hunter2 secret\n\n")
    assert "hunter2" not in err


@pytest.mark.parametrize("operation", ["store", "erase", "some-future-op"])
def test_store_erase_and_unknown_operations_do_nothing(org_key: OrgKey, hermetic, operation: str) -> None:
    before = sorted(str(p) for p in hermetic.rglob("*"))
    assert ask(operation, f"protocol=https\nhost={HOST}\npath=a.git\nusername=t\npassword=eyJx.eyJy.z\n\n") == (0, "", "")
    assert sorted(str(p) for p in hermetic.rglob("*")) == before


def test_wrong_usage_is_one_line_with_exit_2() -> None:
    proc = subprocess.run([os.path.join(BIN, "git-credential-codestore")], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""


def _fill(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "credential", "fill"], input=text, capture_output=True, text=True, timeout=60)


def test_git_credential_fill_through_the_installed_helper_returns_a_token(org_key: OrgKey) -> None:
    git("config", "--global", f"credential.https://{HOST}.helper", "codestore")
    git("config", "--global", f"credential.https://{HOST}.useHttpPath", "true")
    proc = _fill(f"url=https://{HOST}/team/app.git\n\n")
    assert proc.returncode == 0, proc.stderr
    fields = reply_fields(proc.stdout)
    assert fields["username"] == "t" and claims(fields["password"])["repo"] == "team/app"


def test_git_does_not_fall_back_to_a_prompt_when_the_helper_cannot_mint(hermetic, monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat: a headless sandbox hanging forever at a username prompt.
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    monkeypatch.delenv("GIT_TERMINAL_PROMPT")
    git("config", "--global", f"credential.https://{HOST}.helper", "codestore")
    git("config", "--global", f"credential.https://{HOST}.useHttpPath", "true")
    proc = subprocess.run(
        ["git", "credential", "fill"], input=f"url=https://{HOST}/a.git\n\n", capture_output=True, text=True,
        timeout=30, start_new_session=True,  # no controlling terminal, as in a sandbox
    )
    assert proc.returncode != 0 and "password=" not in proc.stdout
    assert "codestore key generate" in proc.stderr


def test_options_from_the_helper_line_name_the_host_for_users_without_configuration(org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> None:
    # `codestore setup --system` writes `helper = codestore --org ORG [--base-url URL]`.
    monkeypatch.delenv("CODESTORE_ORG")
    out, err = io.BytesIO(), io.BytesIO()
    request = b"protocol=http\nhost=127.0.0.1:9\npath=team/app.git\n\n"
    status = credential.run(["--org", ORG, "--base-url", "http://127.0.0.1:9", "get"], io.BytesIO(request), out, err, dict(os.environ))
    assert status == 0 and reply_fields(out.getvalue().decode())["password"].startswith("eyJ"), err.getvalue()
    for bad in (["--org", "get"], ["--frob", "x", "get"], ["--org", ORG, "--base-url", "get"]):
        out, err = io.BytesIO(), io.BytesIO()
        status = credential.run(bad, io.BytesIO(request), out, err, dict(os.environ))
        assert status == 2 and err.getvalue().decode().count("\n") == 1 and out.getvalue() == b"", bad


@pytest.mark.parametrize("prog", ["git-credential-codestore", "git-remote-codestore"])
def test_ctrl_c_while_the_helper_waits_for_git_is_exit_130_without_a_traceback(org_key: OrgKey, prog: str) -> None:
    # The credential helper reads git's request before its error boundary (to its end, so a
    # person trying it by hand waits there and presses Ctrl-C): a KeyboardInterrupt traceback.
    import signal

    args = ["get"] if prog == "git-credential-codestore" else ["origin", f"codestore://{ORG}/team/app"]
    # SIGINT as a terminal leaves it: a suite started in the background (CI) inherits it ignored.
    proc = subprocess.Popen([os.path.join(BIN, prog), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdin is not None
    proc.stdin.write("protocol=https\n" if prog == "git-credential-codestore" else "capabilities\n")
    proc.stdin.flush()
    time.sleep(1.0)  # past its imports: waiting for the rest of git's input
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode in (130, -signal.SIGINT), proc.returncode
