"""Bad input found by probing the agent and its CLI: each refused in one line (or shown
harmless), never a 500, a hang, a traceback or a secret echoed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from git_credential_codestore import audit
from git_credential_codestore.agent import policy
from git_credential_codestore.agent.client import Endpoint, exchange
from git_credential_codestore.agent.db import Database
from git_credential_codestore.errors import ConfigError, for_terminal, redact
from tests.conftest import OrgKey, run_cli
from tests.test_agent import REPO, Agent


def exchange_json(agent: Agent, path: str, body: object) -> tuple[int, dict[str, object]]:
    status, raw = exchange(Endpoint("unix", agent.socket), "POST", path, json.dumps(body).encode(), "application/json")
    return status, json.loads(raw)


@pytest.mark.parametrize("args", [["--request-deadline", "nan"], ["--request-deadline", "-nan"], ["--idle-timeout", "-5"]])
def test_a_duration_that_is_not_one_is_a_usage_error(args: list[str], org_key: OrgKey, tmp_path: Path) -> None:
    # `nan` passed the range check (NaN compares false with both bounds): the agent said
    # "ready", then every connection died in a traceback and nothing was answered.
    proc = run_cli("codestore", "agent", "serve", "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "s" / "a.sock"), *args,
                   timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and args[0] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_libpq_key_value_store_string_is_refused_not_made_a_file_named_after_its_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError, match="libpq key=value") as e:
        Database("host=127.0.0.1 port=1 password=SECRETKV")
    assert "SECRETKV" not in str(e.value) and not list(cwd.iterdir())


def test_a_grant_secret_is_redacted_wherever_redact_runs() -> None:
    # A sandbox's push report reason holding its own grant secret went to the audit log whole.
    text = redact("remote: bad csg_ab12cd34ef56_Zx-9_QqSECRET; Authorization: Grant csg_x_y; Identity eyJa.b.c")
    assert "SECRET" not in text and "csg_x_y" not in text and "eyJ" not in text
    assert "csg_ab12cd34ef56_<redacted>" in text  # the id stays: it says which grant leaked


def test_what_a_terminal_would_act_on_is_shown_escaped() -> None:
    # Threat: a sandbox's push report (its reason) writing to the owner's clipboard (OSC 52)
    # or drawing fake lines when the owner runs `codestore audit`.
    evil = "\x1b]52;c;ZWNobyBwd25lZAo=\x07\x1b[31mFAKE\x1b[0m\u202e\x9b"
    entry = {"time": "2026-11-29T00:00:00Z", "event": "push", "repo": "team/app", "grant": "g1", "sub": evil,
             "refs": [{"ref": "refs/heads/x", "old": "0" * 40, "new": "a" * 40, "result": "error", "reason": evil}]}
    line = audit.describe(entry)
    assert not any(c in line for c in "\x1b\x07\u202e\x9b") and "\\x1b]52" in line and "FAKE" in line
    assert for_terminal("team/app ok") == "team/app ok"
    with pytest.raises(ConfigError, match="--repo"):
        policy.parse_terms({"repos": ["team/\x1b[2J"]})


@pytest.mark.parametrize("repo", ["../x", "team//app", "team/./app", "team/", "/team"])
def test_a_grant_for_a_repository_no_id_can_name_is_refused(repo: str) -> None:
    # Accepted before, it could never mint: no repository id has such a part.
    with pytest.raises(ConfigError, match="has an empty, '.' or '..' part"):
        policy.parse_terms({"repos": [repo]})
    assert policy.parse_terms({"repos": ["team/*", "*", "team/app"]}).repos == ["team/*", "*", "team/app"]


@pytest.mark.parametrize("repo, says", [
    ("team/app+ephemeral", "give --repo team/app (with --ephemeral-only"),  # the README's codestore://acme/team/app+ephemeral
    ("team/app.git", "without it, --repo team/app"),
    ("team/" + "a" * 600, "at most 512 characters"),  # was blamed on control characters
])
def test_a_grant_pattern_that_could_never_mint_says_what_to_give_instead(repo: str, says: str) -> None:
    # Accepted before: every token request under it was then refused ("does not cover").
    with pytest.raises(ConfigError, match=re.escape(says)):
        policy.parse_terms({"repos": [repo]})


@pytest.mark.parametrize("path, body, field", [
    ("/v1/grants", {"repos": [REPO], "max_ttl_seconds": 60}, "max_ttl_seconds"),  # was a grant of the default 900 s
    ("/v1/grants", {"repos": [REPO], "scope": "git:write"}, "scope"),
    ("/v1/trust", {"issuer": "https://issuer.example", "audience": "a", "claims": [["repository_owner", "acme"]],
                   "repos": [REPO], "max_ttl_s": 60}, "max_ttl_s"),
])
def test_a_field_an_admin_request_does_not_take_is_a_400_naming_it(agent: Agent, path: str, body: object, field: str) -> None:
    # Ignored, a misspelt limit made a grant (or a trust policy) with the default in its
    # place and said nothing: less privilege asked for, more granted.
    status, reply = exchange_json(agent, path, body)
    error = str(reply.get("error"))
    assert status == 400 and f"has no field {field!r}; it takes " in error and "max_ttl" in error, (status, reply)
    made = exchange_json(agent, "/v1/grants", {"repos": [REPO]})  # the fields it takes still work
    assert made[0] == 201, made


@pytest.mark.parametrize("path, body", [
    ("/v1/grants", {"repos": [REPO], "expires_in": 99999999999999999999999}),
    ("/v1/grants", {"repos": [REPO], "expires_in": True}),
    ("/v1/audit/query", {"before": 18446744073709551616}),
    ("/v1/audit/query", {"before": 2 ** 63}),
    ("/v1/grants", {"repos": [REPO], "own_socket": "no"}),  # was a socket: any truthy value counted
    ("/v1/grants", {"repos": [REPO], "ephemeral_only": 1}),
    ("/v1/audit/query", [1, 2]),  # was "no filters": the whole trail
    ("/v1/audit/query", "x"),
])
def test_a_value_out_of_range_or_of_the_wrong_type_is_a_400(agent: Agent, path: str, body: object) -> None:
    status, reply = exchange_json(agent, path, body)
    assert status == 400 and "internal error" not in str(reply.get("error")), (status, reply)


@pytest.mark.parametrize("args, says", [
    (["nothex"], "is not a grant id"),
    (["\u00e9"], "is not a grant id"),
    (["csg_ab12cd34ef56_SECRETSECRET"], "looks like a grant's secret"),
])
def test_grant_revoke_of_something_that_is_not_an_id_says_so_without_echoing_it(agent: Agent, args: list[str], says: str) -> None:
    proc = agent.cli("grant", "revoke", *args)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "SECRET" not in proc.stderr, proc.stderr
    assert says in proc.stderr, proc.stderr


def test_a_bad_ref_rule_names_the_part_that_is_wrong() -> None:
    from git_credential_codestore.vocab import parse_ref_policy

    with pytest.raises(ConfigError, match=r"unknown ref op 'rm-rf' in the rule for refs/heads/x; ops: ") as e:
        parse_ref_policy("x=rm-rf")
    assert "[" not in str(e.value)  # not a Python repr of the parsed rule
    with pytest.raises(ConfigError, match=r"bad ref pattern 'a b'"):
        parse_ref_policy("a b=no-push")
