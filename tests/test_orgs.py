"""Several orgs on one machine: [orgs.NAME] sections, chosen by host or codestore:// org."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from git_credential_codestore import config
from git_credential_codestore.errors import ConfigError
from tests.conftest import KID, DevServer, OrgKey, git, make_key, run_cli, start_dev_server

REPO = "team/app"


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {"CODESTORE_CONFIG": str(path)}


TWO_ORGS = """
org = "acme"
kid = "k1"
[orgs.personal]
org = "me"
kid = "k2"
ttl = 120
scopes = "git:read git:write"
[orgs.personal.repos."notes/*"]
scopes = "git:read"
[orgs.selfhosted]
base_url = "https://git.example.org"
"""


def test_a_file_with_one_org_and_no_sections_reads_as_before(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'org = "acme"\nkid = "k1"\n'))
    assert (cfg.org, cfg.kid, cfg.name, cfg.uses_env) == ("acme", "k1", "", True)
    assert config.all_orgs(write(tmp_path, 'org = "acme"\n')) == [cfg._replace(kid=None)]


@pytest.mark.parametrize(
    "host,section,org",
    [
        ("acme.code.storage", "", "acme"),
        ("me.code.storage", "personal", "me"),
        ("git.example.org", "selfhosted", "selfhosted"),
        ("github.com", "", "acme"),  # no org serves it: the default, which does not serve it either
    ],
)
def test_the_host_git_asks_about_chooses_the_org(tmp_path: Path, host: str, section: str, org: str) -> None:
    cfg = config.load(write(tmp_path, TWO_ORGS), host=("https", host))
    assert (cfg.name, cfg.org) == (section, org)
    assert cfg.serves("https", host) == (host != "github.com")


def test_each_org_has_its_own_settings_and_repo_rules(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO_ORGS), org="me")
    assert (cfg.kid, cfg.ttl, cfg.scopes) == ("k2", 120, ("git:read", "git:write"))
    assert cfg.scopes_for("notes/x", False) == ("git:read",)
    default = config.load(write(tmp_path, TWO_ORGS), org="acme")
    assert (default.name, default.kid, default.ttl, default.scopes) == ("", "k1", 300, ("git:read",))


def test_the_environment_configures_the_default_org_not_a_section_chosen_by_host(tmp_path: Path) -> None:
    # Threat: the environment's key (or grant) for one org signing tokens sent to another org's host.
    env = {**write(tmp_path, TWO_ORGS), "CODESTORE_KID": "env-kid", "CODESTORE_PRIVATE_KEY_FILE": "/x/acme.pem"}
    personal = config.load(env, host=("https", "me.code.storage"))
    assert personal.kid == "k2" and personal.private_key_file is None and personal.uses_env is False
    from git_credential_codestore import keys

    assert [s.name for s in keys.sources(personal, env)][0] != "/x/acme.pem"
    assert all(getattr(s, "path", "") != "/x/acme.pem" for s in keys.sources(personal, env))
    assert config.load(env).kid == "env-kid"


def test_codestore_org_names_a_section_whose_settings_come_from_the_file_alone(tmp_path: Path) -> None:
    # Threat: CODESTORE_PRIVATE_KEY_FILE set for the default org signing for the section's org.
    env = {**write(tmp_path, TWO_ORGS), "CODESTORE_ORG": "personal", "CODESTORE_TTL": "60", "CODESTORE_PRIVATE_KEY_FILE": "/x/acme.pem"}
    cfg = config.load(env)
    assert (cfg.name, cfg.org, cfg.ttl, cfg.private_key_file, cfg.uses_env) == ("personal", "me", 120, None, False)
    assert config.load({**env, "CODESTORE_ORG": "me"}).name == "personal"  # by its org, too
    assert config.load({**env, "CODESTORE_ORG": "other"}).name == ""  # no section: the default, as before


def test_all_orgs_lists_the_default_and_every_section(tmp_path: Path) -> None:
    assert [(c.name, c.org) for c in config.all_orgs(write(tmp_path, TWO_ORGS))] == [
        ("", "acme"), ("personal", "me"), ("selfhosted", "selfhosted"),
    ]


def test_all_orgs_keeps_the_default_when_codestore_org_names_a_section(tmp_path: Path) -> None:
    env = {**write(tmp_path, TWO_ORGS), "CODESTORE_ORG": "personal"}
    assert [(c.name, c.org) for c in config.all_orgs(env)] == [("", "acme"), ("personal", "me"), ("selfhosted", "selfhosted")]


def test_sections_only_without_a_default_org(tmp_path: Path) -> None:
    env = write(tmp_path, '[orgs.a]\nkid = "1"\n[orgs.b]\nkid = "2"\n')
    assert [c.org for c in config.all_orgs(env)] == ["a", "b"]
    assert config.load(env, host=("https", "b.code.storage")).kid == "2"


@pytest.mark.parametrize(
    "text,message",
    [
        ('orgs = "x"\n', "must hold tables"),
        ('[orgs.a]\nprivate_key = "x"\n', r"\[orgs.a\]: unknown setting"),
        ('[orgs.a]\nkid = 3\n', "kid must be a string"),
    ],
)
def test_a_bad_section_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.all_orgs(write(tmp_path, text))


def test_config_set_with_org_writes_that_section(tmp_path: Path) -> None:
    env = dict(os.environ, **write(tmp_path, 'org = "acme"\n'))
    assert run_cli("codestore", "--org", "me", "config", "set", "kid", "k2", env=env).returncode == 0
    assert run_cli("codestore", "--org", "me", "config", "set", "ttl", "90", env=env).returncode == 0
    assert run_cli("codestore", "--org", "acme", "config", "set", "kid", "k1", env=env).returncode == 0
    text = (tmp_path / "config.toml").read_text()
    assert text == 'org = "acme"\nkid = "k1"\n\n[orgs.me]\nkid = "k2"\nttl = "90"\n'
    shown = json.loads(run_cli("codestore", "config", "show", "--json", env=env).stdout)
    assert shown["org"] == "acme" and [(o["section"], o["org"], o["kid"]) for o in shown["orgs"]] == [("me", "me", "k2")]
    mine = json.loads(run_cli("codestore", "--org", "me", "config", "show", "--json", env=env).stdout)
    assert (mine["section"], mine["org"], mine["ttl"]) == ("me", "me", 90)


@pytest.fixture
def two_servers(tmp_path: Path, org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DevServer, DevServer, OrgKey]]:
    """acme's dev server (the default org, from the environment) and org `me`'s, with its own key."""
    me_key = make_key(tmp_path, name="me")
    me_key.org = "me"
    acme = start_dev_server(tmp_path / "acme-server", org_key)
    me = start_dev_server(tmp_path / "me-server", me_key, "--org", "me")
    monkeypatch.setenv("CODESTORE_BASE_URL", acme.url)
    (tmp_path / "home/.config/codestore").mkdir(parents=True, exist_ok=True)
    (tmp_path / "home/.config/codestore/config.toml").write_text(
        f'[orgs.me]\nbase_url = "{me.url}"\nkid = "{KID}"\nprivate_key_file = "{me_key.path}"\nscopes = "git:read git:write"\n'
    )
    try:
        yield acme, me, me_key
    finally:
        acme.stop()
        me.stop()


def test_one_helper_serves_two_orgs_each_with_its_own_key(two_servers: tuple[DevServer, DevServer, OrgKey], tmp_path: Path) -> None:
    acme, me, me_key = two_servers
    env = dict(os.environ, CODESTORE_AGENT="off")
    setup = run_cli("codestore", "setup", env=env)
    assert setup.returncode == 0 and acme.url in setup.stdout and me.url in setup.stdout
    acme.create_repo(REPO)
    # me's server has its own org (`--org me`): tokens signed by acme's key are refused there.
    token = run_cli("codestore", "--org", "me", "token", REPO, "--scope", "repo:write", env=env).stdout.strip()
    assert me.api("POST", "/api/v1/repos", token, {"default_branch": "main"})[0] in (200, 201)
    for server, url in ((acme, f"{acme.url}/{REPO}.git"), (me, f"{me.url}/{REPO}.git")):
        git("clone", "-q", url, str(tmp_path / f"clone-{server.data_dir.name}"), env=env)
    # The remote helper picks the org by the codestore:// URL's org; me's config allows push.
    work = tmp_path / "via-remote"
    git("clone", "-q", f"codestore://me/{REPO}", str(work), env=env)
    (work / "f").write_text("f\n")
    git("add", "f", cwd=work, env=env)
    git("commit", "-qm", "f", cwd=work, env=env)
    git("push", "-q", "origin", "HEAD:main", cwd=work, env=env)
    pushes = [r for r in me.requests() if r.get("service") == "git-receive-pack" and r.get("status") == 200]
    assert pushes and pushes[-1].get("kid") == KID
    doctor = json.loads(run_cli("codestore", "doctor", "--json", env=env).stdout)
    names = {c["name"]: c["ok"] for c in doctor["checks"]}
    assert names["key [acme]"] and names["key [me]"] and names["git setup [acme]"] and names["git setup [me]"]


def test_keys_are_stored_per_org(tmp_path: Path, hermetic: Path) -> None:
    # Threat: generating a key for one org replacing (or signing with) another org's key.
    env = dict(os.environ, **write(tmp_path, 'org = "acme"\n[orgs.personal]\norg = "me"\n'))
    assert run_cli("codestore", "key", "generate", env=env).returncode == 0
    assert run_cli("codestore", "--org", "personal", "key", "generate", env=env).returncode == 0
    keys_dir = hermetic / ".local/share/codestore/keys"
    assert sorted(p.name for p in keys_dir.iterdir()) == ["acme.pem", "me.pem"]
    acme = json.loads(run_cli("codestore", "key", "public", "--json", env=env).stdout)
    me = json.loads(run_cli("codestore", "--org", "me", "key", "public", "--json", env=env).stdout)
    assert (acme["org"], me["org"]) == ("acme", "me") and acme["pem"] != me["pem"]


def test_an_orgs_name_in_any_case_is_one_org_with_one_key(tmp_path: Path, hermetic: Path) -> None:
    # Org names are compared without case (a DNS label), but the key was stored under the name
    # as written: CODESTORE_ORG=ACME made a second key beside acme's, and signed with it.
    keys_dir = hermetic / ".local/share/codestore/keys"
    assert run_cli("codestore", "key", "generate", env=dict(os.environ, CODESTORE_ORG="ACME")).returncode == 0
    assert sorted(p.name for p in keys_dir.iterdir()) == ["acme.pem"]
    public = {org: json.loads(run_cli("codestore", "key", "public", "--json", env=dict(os.environ, CODESTORE_ORG=org)).stdout)["pem"]
              for org in ("ACME", "acme", "Acme")}
    assert len(set(public.values())) == 1
    refused = run_cli("codestore", "key", "generate", env=dict(os.environ, CODESTORE_ORG="Acme"))
    assert refused.returncode != 0 and "--force" in refused.stderr  # the same org's key, not a new one


def test_a_key_stored_under_the_orgs_name_as_written_before_is_still_found_and_removed(tmp_path: Path, hermetic: Path) -> None:
    keys_dir = hermetic / ".local/share/codestore/keys"
    assert run_cli("codestore", "key", "generate", env=dict(os.environ, CODESTORE_ORG="acme")).returncode == 0
    (keys_dir / "acme.pem").rename(keys_dir / "ACME.pem")  # where an earlier codestore kept CODESTORE_ORG=ACME's key
    env = dict(os.environ, CODESTORE_ORG="ACME")
    assert run_cli("codestore", "key", "public", env=env).returncode == 0
    removed = run_cli("codestore", "key", "delete", env=env)
    assert removed.returncode == 0, removed.stderr
    assert list(keys_dir.iterdir()) == []
