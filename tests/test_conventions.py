"""What users of other git credential tools expect: versions, completion, exit codes, --json."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from git_credential_codestore import __version__
from tests.conftest import BIN, ORG, DevServer, OrgKey, run_cli
from tests.leakscan import key_needles, secrets_in_text


@pytest.mark.parametrize("prog", ["codestore", "git-credential-codestore", "git-remote-codestore"])
def test_every_program_prints_the_one_version(prog: str) -> None:
    proc = run_cli(prog, "--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip().endswith(__version__) and proc.stdout.count("\n") == 1


def test_the_helpers_version_path_reads_no_package_metadata() -> None:
    # The version is a constant in the package: no importlib.metadata on the helpers' path.
    code = (
        "import io, os, sys; from git_credential_codestore import credential;"
        "credential.run(['--version'], io.BytesIO(), io.BytesIO(), io.BytesIO(), os.environ);"
        "print('importlib.metadata' in sys.modules)"
    )
    out = subprocess.run([os.path.join(BIN, "python"), "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef codestore"),
                                          ("fish", "complete --no-files --command codestore")])
def test_completion_prints_the_shells_script(shell: str, marker: str) -> None:
    proc = run_cli("codestore", "completion", shell)
    assert proc.returncode == 0 and marker in proc.stdout and "_CODESTORE_COMPLETE" in proc.stdout


def test_the_completion_script_completes_commands_through_the_real_program() -> None:
    env = dict(os.environ, _CODESTORE_COMPLETE="bash_complete", COMP_WORDS="codestore gra", COMP_CWORD="1")
    proc = subprocess.run([os.path.join(BIN, "codestore")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["plain,grant"]


def test_an_unknown_shell_is_a_usage_error() -> None:
    proc = run_cli("codestore", "completion", "ksh")
    assert proc.returncode == 2 and proc.stderr.startswith("codestore: ") and proc.stderr.count("\n") == 1


def test_help_documents_the_exit_codes() -> None:
    out = run_cli("codestore", "--help").stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n    {code}" in out, code


@pytest.mark.parametrize(
    "args,code",
    [
        (["config", "set", "nope", "x"], 1),  # an expected failure
        (["token"], 2),  # usage
        (["no-such-command"], 2),
    ],
)
def test_exit_codes_are_the_documented_ones(args: list[str], code: int) -> None:
    proc = run_cli("codestore", *args)
    assert proc.returncode == code and proc.stderr.startswith("codestore: ")


def test_config_show_json_names_the_settings(org_key: OrgKey) -> None:
    proc = run_cli("codestore", "config", "show", "--json")
    data = json.loads(proc.stdout)
    assert data["org"] == ORG and data["kid"] == "k1" and data["scopes"] == ["git:read"]
    assert data["private_key_file"] == str(org_key.path)
    assert set(data) >= {"file", "org", "base_url", "api_url", "kid", "ttl", "scopes", "ephemeral_scopes", "sub", "repos", "orgs", "section"}


def test_token_json_shows_the_claims_and_not_the_token(org_key: OrgKey) -> None:
    # Threat: a state-reporting flag that prints the secret it reports on.
    proc = run_cli("codestore", "token", "team/app", "--json", env=dict(os.environ, CODESTORE_AGENT="off"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["claims"]["repo"] == "team/app" and data["claims"]["iss"] == ORG and data["header"]["kid"] == "k1"
    assert data["expires_at"] == data["claims"]["exp"] and "token" not in data
    assert secrets_in_text(proc.stdout) == []


def test_token_json_includes_the_token_only_when_asked(org_key: OrgKey) -> None:
    proc = run_cli("codestore", "token", "team/app", "--json", "--include-token", env=dict(os.environ, CODESTORE_AGENT="off"))
    data = json.loads(proc.stdout)
    claims = data["token"].split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))) == data["claims"]
    assert run_cli("codestore", "token", "team/app", "--include-token").returncode == 2


def test_key_public_json_has_the_public_half_only(org_key: OrgKey) -> None:
    # Threat: the private key printed alongside its public half.
    proc = run_cli("codestore", "key", "public", "--json")
    data = json.loads(proc.stdout)
    assert data["alg"] == "ES256" and data["kid"] == "k1" and data["jwk"]["kty"] == "EC"
    assert data["pem"].startswith("-----BEGIN PUBLIC KEY-----") and data["source"] == str(org_key.path)
    assert secrets_in_text(proc.stdout, key_needles(org_key.pem)) == []


def test_doctor_json_reports_each_check_and_exits_1_on_failure(org_key: OrgKey) -> None:
    proc = run_cli("codestore", "doctor", "--json")
    data = json.loads(proc.stdout)
    names = [c["name"] for c in data["checks"]]
    assert names[:2] == ["config", "key"] and "git setup" in names
    assert data["ok"] is False and proc.returncode == 1  # git is not set up for the host
    assert all(set(c) == {"name", "ok", "warning", "detail"} for c in data["checks"])


def test_repo_list_json(dev_server: DevServer) -> None:
    dev_server.create_repo("team/app")
    proc = run_cli("codestore", "repo", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {"repo_id": "team/app", "default_branch": "main"} in json.loads(proc.stdout)
