"""The shared vocabulary: scopes, TTLs, repository ids, URLs, ref policies, token requests."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_credential_codestore import vocab
from git_credential_codestore.errors import ConfigError
from git_credential_codestore.vocab import TokenRequest


def test_write_implies_read() -> None:
    assert vocab.parse_scopes("git:write", "x") == ("git:read", "git:write")
    assert vocab.allows(["git:write"], "git:read") and not vocab.allows(["git:read"], "git:write")


@pytest.mark.parametrize("ttl", ["0", "3601", "ten", "-5", 29, True])
def test_ttls_outside_the_bounds_are_refused_by_the_one_check(ttl: object) -> None:
    with pytest.raises(ConfigError, match="TTL"):
        vocab.check_ttl(ttl, "ttl")


@pytest.mark.parametrize(
    "path,expected",
    [
        ("team/app.git", ("team/app", False)),
        ("team/app+ephemeral.git", ("team/app", True)),
        ("app", ("app", False)),
        ("/a/b/c.git", ("a/b/c", False)),
    ],
)
def test_repository_paths_split_into_id_and_namespace(path: str, expected: tuple[str, bool]) -> None:
    assert vocab.split_repo_path(path) == expected


@pytest.mark.parametrize(
    "path,expected",
    [("team/app+import.git", ("team/app", "+import")), ("team/app+ephemeral", ("team/app", "+ephemeral")), ("a.git", ("a", ""))],
)
def test_the_ephemeral_and_import_suffixes_name_the_base_repository(path: str, expected: tuple[str, str]) -> None:
    # Code Storage serves {repo}+ephemeral.git and {repo}+import.git with the base repository's token.
    assert vocab.split_repo_suffix(path) == expected


@pytest.mark.parametrize("bad", ["", "..", "a/../b", "a//b", ".hidden", "-rf", "a b", "a+b", "a\nb", "x" * 201, "a/b.git.git"])
def test_ids_that_name_no_repository_are_rejected_not_normalised(bad: str) -> None:
    with pytest.raises(ConfigError):
        vocab.split_repo_path(bad)


@pytest.mark.parametrize(
    "bad",
    # Where the old validators disagreed: `_x` passed the config's check and not the dev
    # server's route; `a.git/objects` passed the config's and named a file inside `a`.
    ["_x", "a.git/objects", "team/", "/team", "a%2fb", "é", "a\\b", "a+import", "a:b", 3],
)
def test_the_one_validator_rejects_what_any_part_would_refuse(bad: object) -> None:
    with pytest.raises(ConfigError):
        vocab.validate_repo_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["app", "team/app", "team/project-alpha", "a_b/c.d/e-f", "x" * 200, "org"])
def test_one_validator_accepts_what_every_part_serves(good: str) -> None:
    assert vocab.validate_repo_id(good) == good


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1", True), ("127.255.0.9", True), ("localhost", True), ("::1", True), ("LOCALHOST", True),
        ("127.0.0.256", False), ("127.1", False), ("10.0.0.1", False), ("128.0.0.1", False),
        ("127.0.0.1.evil.com", False), ("0:0:0:0:0:0:0:1", False), ("", False),
    ],
)
def test_only_loopback_hosts_may_carry_tokens_over_plain_http(host: str, expected: bool) -> None:
    # Threat: a token sent unencrypted across a network because a host "looked" local.
    assert vocab.is_loopback(host) is expected


@pytest.mark.parametrize(
    "url,expected",
    [
        ("https://acme.code.storage", ("https", "acme.code.storage", "", "", "")),
        ("HTTP://127.0.0.1:8080/git/", ("http", "127.0.0.1:8080", "/git/", "", "")),
        ("https://h/p?q=1#f", ("https", "h", "/p", "q=1", "f")),
        ("https://t:x@h/p", ("https", "t:x@h", "/p", "", "")),
        ("acme.code.storage", ("", "", "acme.code.storage", "", "")),
        ("ht tp://h", ("", "", "ht tp://h", "", "")),
    ],
)
def test_split_url_splits_without_normalising(url: str, expected: tuple[str, ...]) -> None:
    assert tuple(vocab.split_url(url)) == expected


@pytest.mark.parametrize(
    "url,host,port",
    [("https://H.example", "h.example", None), ("http://127.0.0.1:8080/x", "127.0.0.1", 8080),
     ("https://t:x@[::1]:9/p", "::1", 9), ("https://[::1]", "::1", None)],
)
def test_split_url_names_host_and_port(url: str, host: str, port: int | None) -> None:
    parts = vocab.split_url(url)
    assert (parts.host, parts.port) == (host, port)


@pytest.mark.parametrize("url", ["http://h:99999", "http://h:x", "http://h:"])
def test_a_bad_port_is_an_error(url: str) -> None:
    with pytest.raises(ValueError):
        vocab.split_url(url).port  # noqa: B018


@pytest.mark.parametrize(
    "base,path,expected",
    [("https://h", "team/a.git", "team/a.git"), ("https://h/git/", "/git/team/a.git", "team/a.git"),
     ("https://h/git", "other/team/a.git", None), ("https://h/git", "gitx/a.git", None)],
)
def test_a_base_urls_path_prefix_is_stripped_in_one_place(base: str, path: str, expected: str | None) -> None:
    assert vocab.path_under(base, path) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("refs/heads/main=no-push", [("refs/heads/main", ["no-push"])]),
        ("refs/heads/main=no-push;refs/heads/f/*=no-force-push", [("refs/heads/main", ["no-push"]), ("refs/heads/f/*", ["no-force-push"])]),
        # Code Storage's other pattern forms: a short branch name and the catch-all.
        ("main=no-push", [("refs/heads/main", ["no-push"])]),
        ("*=no-force-push", [("*", ["no-force-push"])]),
        ("refs/heads/main=", [("refs/heads/main", [])]),
    ],
)
def test_ref_policies_parse_from_the_command_line_form(text: str, expected: list) -> None:
    assert vocab.parse_ref_policy(text) == expected


@pytest.mark.parametrize("text", ["refs/heads/main=delete-all", "refs/heads/main", "refs/*/main=no-push", "a b=no-push", "=no-push"])
def test_bad_ref_policies_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        vocab.parse_ref_policy(text)


@pytest.mark.parametrize(
    "ref,ops",
    [("refs/heads/main", ["no-push"]), ("refs/heads/feature/x", ["no-force-push"]), ("refs/tags/v1", [])],
)
def test_the_first_matching_rule_wins(ref: str, ops: list[str]) -> None:
    policy = vocab.ref_policy([["main", ["no-push"]], ["refs/heads/feature/*", ["no-force-push"]], ["refs/heads/*", ["no-push"]], ["*", []]])
    assert list(vocab.ref_ops(policy, ref)) == ops


def test_the_legacy_ops_claim_is_a_catch_all_rule() -> None:
    assert vocab.legacy_ops_rule(["no-force-push"]) == [("*", ["no-force-push"])]


def test_a_token_request_is_checked_and_normalised_in_one_place() -> None:
    req = TokenRequest("team/app", ("git:read", "git:read"), refs=[["main", ["no-push"]]], purpose="x" * 50).checked()
    assert req.scopes == ("git:read",) and req.refs == [("refs/heads/main", ["no-push"])] and len(req.purpose) == 20
    for bad in (TokenRequest("../x", ("git:read",)), TokenRequest("a", ()), TokenRequest("a", ("git:admin",)),
                TokenRequest("a", ("git:read",), ttl=99999), TokenRequest("a", ("git:read",), refs=[["main", ["rm"]]])):
        with pytest.raises(ConfigError):
            bad.checked()


# -- branch names: the one rule, held against git's own ------------------------------------

BRANCH_ALPHABET = "ab._-/"  # every character class the rule treats apart: letters, '.', '_', '-', '/'


def git_accepts_branch(name: str) -> bool:
    proc = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.parametrize(
    "name",
    ["main", "feat/x", "a/-b", "a./b", "_x", "0", "release/1.2", "a" * 200,
     ".hidden", "a/.b", "-foo", "a.lock", "a.lock/b", "a/b.lock", "a..b", "a/", "/a", "a//b", "a.", "HEAD", "..", "-"],
)
def test_a_branch_name_passes_exactly_when_git_check_ref_format_takes_it(name: str) -> None:
    assert (name == _accepted(name)) == git_accepts_branch(name)


@pytest.mark.parametrize("name", ["refs/heads/feat", "a b", "a@{1}", "a~1", "a^", "a:b", "a" * 201, "", "é"])
def test_branch_names_outside_the_rule_are_refused_even_where_git_takes_some(name: str) -> None:
    # refs/... is a full ref where a short name belongs; '@', '~', ':', spaces and non-ASCII
    # are outside the alphabet a URL path, a shell and every git version agree on.
    with pytest.raises(ConfigError, match="not a branch name"):
        vocab.validate_branch(name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=BRANCH_ALPHABET, min_size=1, max_size=12))
def test_over_the_rules_alphabet_the_branch_rule_is_gits(name: str) -> None:
    # Threat: a name the dev server or the CLI takes and git then refuses (or the reverse),
    # found only when a push or a promotion fails half way.
    expected = git_accepts_branch(name) and not name.startswith("refs/")
    assert (_accepted(name) == name) == expected, name


def _accepted(name: str) -> str | None:
    try:
        return vocab.validate_branch(name)
    except ConfigError:
        return None
