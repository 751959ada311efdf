"""Key custody: sources in priority order, the keychain, the 0600 fallback, public forms."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from git_credential_codestore import config, keys
from git_credential_codestore.errors import KeyNotFound
from git_credential_codestore.secrets import Secret
from tests.conftest import OrgKey, make_key, run_cli


def cfg(**env: str) -> config.Config:
    return config.load({"CODESTORE_CONFIG": "/nonexistent", "CODESTORE_ORG": "acme", **env})


def test_environment_pem_beats_a_key_file(tmp_path: Path) -> None:
    a, b = make_key(tmp_path, name="a"), make_key(tmp_path, name="b")
    env = {"CODESTORE_PRIVATE_KEY": a.pem, "CODESTORE_PRIVATE_KEY_FILE": str(b.path)}
    key, where = keys.load_private_key(cfg(), env)
    assert where == "CODESTORE_PRIVATE_KEY" and keys.public_pem(key) == a.public_path.read_text()


def test_a_named_key_file_that_is_missing_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(KeyNotFound, match="does not exist"):
        keys.load_private_key(cfg(), {"CODESTORE_PRIVATE_KEY_FILE": str(tmp_path / "nope.pem")})


def test_no_key_anywhere_says_how_to_make_one() -> None:
    with pytest.raises(KeyNotFound, match="codestore key generate"):
        keys.load_private_key(cfg(), {})


def test_garbage_key_material_is_reported_without_echoing_it() -> None:
    # Threat: a key (or near-key) printed into a terminal or log by an error message.
    # A fake: PEM armour around a marker, assembled here so that secret scanners
    # reading the source do not mistake it for a committed key.
    armour = "PRIVATE " + "KEY-----"
    secret = f"-----BEGIN {armour}\nTOPSECRETMATERIAL\n-----END {armour}\n"
    with pytest.raises(KeyNotFound) as e:
        keys.load_private_key(cfg(), {"CODESTORE_PRIVATE_KEY": secret})
    assert "TOPSECRET" not in str(e.value) and "CODESTORE_PRIVATE_KEY" in str(e.value)


def test_without_a_keychain_the_key_goes_to_a_0600_file(hermetic: Path) -> None:
    key = keys.generate("ec")
    where = keys.store_private_key(key, cfg())
    assert where == keys.fallback_key_path("acme") and where.startswith(str(hermetic))
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(where)).st_mode) == 0o700
    loaded, source = keys.load_private_key(cfg(), {})
    assert keys.public_pem(loaded) == keys.public_pem(key)


def test_with_a_working_keychain_the_key_goes_there_and_no_file_is_written(hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An in-memory keyring backend: an OS keychain cannot run in CI.
    import keyring
    from keyring.backend import KeyringBackend

    store: dict[tuple[str, str], str] = {}

    class Backend(KeyringBackend):
        priority = 1

        def get_password(self, service: str, username: str) -> str | None:
            return store.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            store[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            del store[(service, username)]

    previous = keyring.get_keyring()
    keyring.set_keyring(Backend())
    try:
        key = keys.generate("ed25519")
        assert keys.store_private_key(key, cfg()) == "the OS keychain"
        assert not os.path.exists(keys.fallback_key_path("acme"))
        loaded, where = keys.load_private_key(cfg(), {})
        assert where == "the OS keychain" and keys.public_pem(loaded) == keys.public_pem(key)
        assert keys.delete_stored_key(cfg()) == ["the OS keychain"] and not store
    finally:
        keyring.set_keyring(previous)


@pytest.mark.parametrize("kind,kty", [("ec", "EC"), ("rsa", "RSA"), ("ed25519", "OKP")])
def test_public_jwk_round_trips_through_pyjwt(kind: str, kty: str) -> None:
    import jwt

    key = keys.generate(kind)
    jwk = keys.public_jwk(key, "k1")
    assert jwk["kty"] == kty and jwk["kid"] == "k1" and "d" not in jwk
    token = jwt.encode({"a": 1}, key, algorithm=jwk["alg"])
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]]) == {"a": 1}


def test_key_import_reads_stdin_and_generate_refuses_to_overwrite(hermetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", "acme")
    k = make_key(tmp_path)
    proc = run_cli("codestore", "key", "import", "-", input=k.pem)
    assert proc.returncode == 0, proc.stderr
    assert k.pem not in proc.stdout + proc.stderr
    pub = run_cli("codestore", "key", "public")
    assert pub.stdout.strip() == k.public_path.read_text().strip()
    again = run_cli("codestore", "key", "generate")
    assert again.returncode == 1 and "--force" in again.stderr and again.stderr.count("\n") == 1
    # Import too: replacing the key Code Storage knows makes every token refused.
    assert run_cli("codestore", "key", "import", "-", input=k.pem).returncode == 0  # the same key again: nothing lost
    other = make_key(tmp_path, name="other")
    again = run_cli("codestore", "key", "import", "-", input=other.pem)
    assert again.returncode == 1 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert run_cli("codestore", "key", "public").stdout.strip() == k.public_path.read_text().strip()
    assert run_cli("codestore", "key", "import", "--force", "-", input=other.pem).returncode == 0
    assert run_cli("codestore", "key", "public").stdout.strip() == other.public_path.read_text().strip()


def test_key_generate_prints_only_the_public_key(hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", "acme")
    proc = run_cli("codestore", "key", "generate")
    assert proc.returncode == 0, proc.stderr
    assert "BEGIN PUBLIC KEY" in proc.stdout and "PRIVATE" not in proc.stdout + proc.stderr
    assert "0600" in proc.stderr  # says that it fell back to a file


def test_key_import_of_garbage_is_one_line_exit_1(hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTORE_ORG", "acme")
    proc = run_cli("codestore", "key", "import", "-", input="not a key at all")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not a key" not in proc.stderr


def test_secret_type_masks_pem() -> None:
    assert "BEGIN" not in repr(keys.private_pem(keys.generate("ec"))) and repr(Secret("x")) == "Secret(<redacted>)"


def test_a_keychain_known_to_be_unusable_is_skipped_without_importing_keyring(hermetic: Path) -> None:
    # keyring's import is ~55 ms; where no keychain works, the key file is read directly.
    import subprocess
    import sys

    store = ("from git_credential_codestore import config, keys;"
             "keys.store_private_key(keys.generate(), config.load({'CODESTORE_ORG': 'acme', **os.environ}))")
    load = ("import sys; from git_credential_codestore import config, keys;"
            "_, where = keys.load_private_key(config.load({'CODESTORE_ORG': 'acme', **os.environ}));"
            "print(where, 'keyring' in sys.modules)")
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", "import os;" + store], env=env, check=True)
    first = subprocess.run([sys.executable, "-c", "import os;" + load], env=env, check=True, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", "import os;" + load], env=env, check=True, capture_output=True, text=True)
    assert first.stdout.split()[-1] == "True"  # keyring was asked once, and found no keychain
    assert second.stdout.strip() == "the codestore key file False"
    # Another backend choice is another environment: keyring is asked again.
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"
    third = subprocess.run([sys.executable, "-c", "import os;" + load], env=env, check=True, capture_output=True, text=True)
    assert third.stdout.strip() == "the codestore key file True"


@pytest.mark.parametrize("command", [["generate", "--force"], ["import", "-"], ["delete"]])
def test_key_commands_refuse_to_change_a_stored_key_the_environment_overrides(org_key: OrgKey, tmp_path: Path, command: list[str]) -> None:
    # With CODESTORE_PRIVATE_KEY_FILE set, `key generate --force` stored a key that never
    # signs and said "register its public half"; `key delete` said "removed" while signing went on.
    other = make_key(tmp_path, name="other")
    proc = run_cli("codestore", "key", *command, input=other.pem if "import" in command else None)
    assert proc.returncode == 1 and "CODESTORE_PRIVATE_KEY_FILE is set" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert run_cli("codestore", "key", "public").stdout.strip() == org_key.public_path.read_text().strip()
