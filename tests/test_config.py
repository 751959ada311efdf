"""Configuration: the TOML file, environment overrides, repository ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from git_credential_codestore import config, config_cache
from git_credential_codestore.errors import ConfigError


def test_defaults_derive_urls_from_the_org() -> None:
    cfg = config.load({"CODESTORE_ORG": "acme", "CODESTORE_CONFIG": "/nonexistent"})
    assert cfg.base_url == "https://acme.code.storage"
    assert cfg.api_url == "https://api.acme.code.storage"
    assert (cfg.ttl, cfg.scopes) == (300, ("git:read",))


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('org = "fromfile"\nttl = 600\nscopes = "git:read"\n')
    cfg = config.load({"CODESTORE_CONFIG": str(f), "CODESTORE_ORG": "fromenv", "CODESTORE_TTL": "120"})
    assert (cfg.org, cfg.ttl) == ("fromenv", 120)


def test_a_custom_base_url_also_serves_the_api() -> None:
    cfg = config.load({"CODESTORE_ORG": "acme", "CODESTORE_BASE_URL": "http://127.0.0.1:9/", "CODESTORE_CONFIG": "/x"})
    assert cfg.base_url == cfg.api_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("ttl", ["0", "3601", "ten", "-5"])
def test_ttl_beyond_the_hard_maximum_is_a_config_error(ttl: str) -> None:
    with pytest.raises(ConfigError, match="TTL"):
        config.load({"CODESTORE_TTL": ttl, "CODESTORE_CONFIG": "/x"})


def test_unknown_scopes_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown scope"):
        config.load({"CODESTORE_SCOPES": "git:read git:admin", "CODESTORE_CONFIG": "/x"})


@pytest.mark.parametrize("url", ["https://t:secret@acme.code.storage", "ftp://x", "acme.code.storage", "https://h/?q=1"])
def test_base_urls_with_credentials_or_odd_schemes_are_refused(url: str) -> None:
    # Threat: a token smuggled into configuration as URL userinfo.
    with pytest.raises(ConfigError) as e:
        config.load({"CODESTORE_BASE_URL": url, "CODESTORE_CONFIG": "/x"})
    assert "secret" not in str(e.value)


def test_invalid_toml_names_the_file_and_the_fix(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("org = \n")
    with pytest.raises(ConfigError, match=str(f)):
        config.load({"CODESTORE_CONFIG": str(f)})


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('private_key = "-----BEGIN"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load({"CODESTORE_CONFIG": str(f)})


def test_first_matching_repository_rule_wins(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[repos."team/secret"]\nscopes = "git:read"\n[repos."team/*"]\nscopes = "git:write"\nephemeral_scopes = "git:write"\n')
    cfg = config.load({"CODESTORE_CONFIG": str(f)})
    assert cfg.scopes_for("team/secret", False) == ("git:read",)
    assert cfg.scopes_for("team/app", False) == ("git:read", "git:write")
    assert cfg.scopes_for("other", True) == ("git:read",)


def test_serves_only_the_exact_scheme_host_and_port() -> None:
    cfg = config.load({"CODESTORE_BASE_URL": "http://127.0.0.1:8080", "CODESTORE_CONFIG": "/x"})
    assert cfg.serves("http", "127.0.0.1:8080")
    assert not cfg.serves("https", "127.0.0.1:8080")
    assert not cfg.serves("http", "127.0.0.1")


def test_set_value_refuses_a_bad_value_and_keeps_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    env = {"CODESTORE_CONFIG": str(f)}
    config.set_value("org", "acme", env)
    with pytest.raises(ConfigError):
        config.set_value("ttl", "99999", env)
    assert config.load(env).org == "acme" and config.load(env).ttl == 300



def test_a_base_url_with_a_fragment_is_refused() -> None:
    with pytest.raises(ConfigError, match="fragment"):
        config.load({"CODESTORE_BASE_URL": "https://h/#x", "CODESTORE_CONFIG": "/x"})


def _config_toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {"CODESTORE_CONFIG": str(path), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_an_edited_config_file_is_read_again_not_served_from_the_cache(tmp_path: Path) -> None:
    env = _config_toml(tmp_path, 'org = "acme"\n')
    assert config.load(env).org == "acme"
    assert os.listdir(tmp_path / "cache" / "codestore")  # the parsed copy was kept
    (tmp_path / "config.toml").write_text('org = "other"\nkid = "k2"\n')
    assert (config.load(env).org, config.load(env).kid) == ("other", "k2")


def test_the_parsed_copy_is_what_a_later_request_reads(tmp_path: Path) -> None:
    env = _config_toml(tmp_path, 'org = "acme"\n')
    config.load(env)
    path = config_cache.cache_path(env["CODESTORE_CONFIG"], env)
    st = os.stat(env["CODESTORE_CONFIG"])
    config_cache.write(env["CODESTORE_CONFIG"], st, {"org": "cached"}, env)
    assert config.load(env).org == "cached"
    assert config.load(env, cache=False).org == "acme"
    # A damaged cache is no error: the file is parsed again.
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    assert config.load(env).org == "acme"


def test_a_cache_others_could_write_is_ignored(tmp_path: Path) -> None:
    # Threat: another user rewrites the cached configuration to send tokens to their server.
    env = _config_toml(tmp_path, 'org = "acme"\n')
    config.load(env)
    st = os.stat(env["CODESTORE_CONFIG"])
    config_cache.write(env["CODESTORE_CONFIG"], st, {"org": "evil", "base_url": "https://evil.example"}, env)
    os.chmod(config_cache.cache_path(env["CODESTORE_CONFIG"], env), 0o666)
    cfg = config.load(env)
    assert cfg.org == "acme" and cfg.base_url == "https://acme.code.storage"


def test_config_set_leaves_the_parsed_copy_for_the_next_request(tmp_path: Path) -> None:
    env = {"CODESTORE_CONFIG": str(tmp_path / "config.toml"), "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    config.set_value("org", "acme", env)
    st = os.stat(env["CODESTORE_CONFIG"])
    assert config_cache.read(env["CODESTORE_CONFIG"], st, env) == {"org": "acme"}
