"""Coming from the official `git-credential-code-storage`: its settings keep working.

It reads PIERRE_PRIVATE_KEY, PIERRE_PRIVATE_KEY_FILE, PIERRE_TOKEN_TTL and PIERRE_DEBUG;
codestore takes each where its own CODESTORE_* name is unset. Repository ids in URL
paths may be percent-encoded, as Code Storage accepts them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jwt
import pytest

from git_credential_codestore import config
from git_credential_codestore.errors import ConfigError
from tests.conftest import ORG, DevServer, OrgKey, git
from tests.test_credential import ask, claims, reply_fields

REQUEST = f"protocol=https\nhost={ORG}.code.storage\npath=team/app.git\n\n"


def official_env(key: OrgKey, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODESTORE_PRIVATE_KEY")}
    return dict(env, CODESTORE_ORG=ORG, **extra)


def test_pierre_private_key_file_is_used_when_ours_is_unset(org_key: OrgKey) -> None:
    status, out, err = ask("get", REQUEST, official_env(org_key, PIERRE_PRIVATE_KEY_FILE=str(org_key.path)))
    assert status == 0 and reply_fields(out)["password"].startswith("eyJ"), err


def test_pierre_private_key_text_is_used_when_ours_is_unset(org_key: OrgKey) -> None:
    status, out, err = ask("get", REQUEST, official_env(org_key, PIERRE_PRIVATE_KEY=org_key.pem))
    token = reply_fields(out)["password"]
    jwt.decode(token, org_key.public_path.read_text(), algorithms=["ES256"], options={"verify_aud": False})


def test_our_names_win_over_the_official_ones(org_key: OrgKey, tmp_path: Path) -> None:
    env = {"CODESTORE_CONFIG": "/nonexistent", "CODESTORE_TTL": "120", "PIERRE_TOKEN_TTL": "3600",
           "CODESTORE_PRIVATE_KEY_FILE": "/ours.pem", "PIERRE_PRIVATE_KEY_FILE": "/theirs.pem"}
    cfg = config.load(env)
    assert (cfg.ttl, cfg.private_key_file) == (120, "/ours.pem")
    assert config.getenv(env, "CODESTORE_PRIVATE_KEY_FILE") == "/ours.pem"


def test_pierre_token_ttl_sets_the_lifetime_within_our_maximum(org_key: OrgKey) -> None:
    status, out, err = ask("get", REQUEST, official_env(org_key, PIERRE_PRIVATE_KEY_FILE=str(org_key.path), PIERRE_TOKEN_TTL="600"))
    c = claims(reply_fields(out)["password"])
    exp, iat = c["exp"], c["iat"]
    assert isinstance(exp, int) and isinstance(iat, int) and exp - iat == 600


def test_an_hour_long_official_ttl_beyond_ours_names_the_variable_to_fix() -> None:
    # The official helper's TTL may be any length; ours stops at an hour.
    with pytest.raises(ConfigError, match="PIERRE_TOKEN_TTL.*outside"):
        config.load({"CODESTORE_CONFIG": "/x", "PIERRE_TOKEN_TTL": "86400"})


def test_pierre_debug_traces_each_request_without_the_token(org_key: OrgKey) -> None:
    status, out, err = ask("get", REQUEST, official_env(org_key, PIERRE_PRIVATE_KEY_FILE=str(org_key.path), PIERRE_DEBUG="1"))
    token = reply_fields(out)["password"]
    assert f"debug: get https://{ORG}.code.storage/team/app.git: a token" in err
    # Threat: a debug trace that prints the credential it traces.
    assert token not in err and token.split(".")[2] not in err
    _, _, quiet = ask("get", REQUEST, official_env(org_key, PIERRE_PRIVATE_KEY_FILE=str(org_key.path), PIERRE_DEBUG="0"))
    assert quiet == ""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("team%2Fapp.git", ("team/app", False)),
        ("team%2fapp%2Bephemeral.git", ("team/app", True)),
        ("team/my%2Dapp", ("team/my-app", False)),
    ],
)
def test_percent_encoded_repository_ids_are_decoded(path: str, expected: tuple[str, bool]) -> None:
    assert config.split_repo_path(path) == expected


@pytest.mark.parametrize("bad", ["a%2F..%2Fb", "%2E%2E", "team%2Fapp%2B", "%2Fteam", "a%2", "a%zz", "a%FF", "a%20b", "a%2Eb%2Egit%2Egit"])
def test_encoded_ids_are_judged_like_literal_ones(bad: str) -> None:
    # Threat: an escape smuggling `..`, `+` or a leading `/` past the repository-id check.
    with pytest.raises(ConfigError):
        config.split_repo_path(bad)


def test_a_percent_encoded_codestore_url_clones_the_repository(dev_server: DevServer, tmp_path: Path) -> None:
    dev_server.create_repo("team/app")
    proc = subprocess.run(["git", "clone", f"codestore://{ORG}/team%2Fapp", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert git("rev-parse", "--is-inside-work-tree", cwd=tmp_path / "w").stdout.strip() == "true"
