"""The one exception tree: every expected failure is a CodestoreError, with one refusal type."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from git_credential_codestore import config, credential, errors, keys
from git_credential_codestore.agent import policy
from git_credential_codestore.errors import CodestoreError, InvalidKey, KeyNotFound, ProtocolError, Refused


def test_the_helpers_and_the_agent_share_one_protocol_error() -> None:
    from remote_helper import protocol

    assert credential.ProtocolError is protocol.ProtocolError is ProtocolError
    assert issubclass(ProtocolError, CodestoreError)


def test_the_agent_and_the_dev_server_share_one_refusal_type() -> None:
    from git_credential_codestore.devserver import auth

    with pytest.raises(Refused) as e:
        auth.token_from_header(None)
    assert e.value.status == 401
    assert policy.Refused is Refused and issubclass(Refused, CodestoreError)


def test_a_refusal_reason_is_one_redacted_line() -> None:
    # Threat: a token echoed back to a client or into a log inside a refusal reason.
    jwt_shaped = "eyJhbGciOiJFUzI1NiJ9.eyJyZXBvIjoiYSJ9.c2lnbmF0dXJl"
    e = Refused(403, f"bad\ntoken {jwt_shaped}\r\n" + "x" * 1000)
    assert e.status == 403 and "\n" not in e.reason and jwt_shaped not in e.reason and len(e.reason) <= 300
    assert jwt_shaped not in str(e)


def test_usage_errors_exit_2() -> None:
    assert errors.UsageError("x").exit_code == 2 and issubclass(errors.UsageError, CodestoreError)


def _pem(key: PrivateKeyTypes) -> keys.Secret:
    return keys.Secret(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode())


@pytest.mark.parametrize("make", [x25519.X25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP384R1())])
def test_a_key_of_the_wrong_type_is_invalid_not_missing(make) -> None:
    # A key that was found but cannot sign must not read as "no key": that message
    # would send the user to generate a key they already have.
    cfg = config.Config(org="acme")
    with pytest.raises(InvalidKey) as e:
        keys.load_private_key(cfg, {"CODESTORE_PRIVATE_KEY": _pem(make()).reveal()})
    assert not isinstance(e.value, KeyNotFound) and "CODESTORE_PRIVATE_KEY" in str(e.value)


def test_an_unknown_key_kind_is_invalid_not_missing() -> None:
    with pytest.raises(InvalidKey, match="unknown key type"):
        keys.generate("dsa")


def test_a_long_value_in_an_error_is_cut_in_the_middle_keeping_the_fix() -> None:
    # A 6000-character repository id (or 300 replica URLs) made a 7 KB "one line".
    from git_credential_codestore.errors import MAX_MESSAGE, ConfigError

    text = str(ConfigError(f"{'x' * 6000} is not a repository id; use a URL like https://acme.code.storage/<repo>.git"))
    assert len(text) <= MAX_MESSAGE + 5 and text.startswith("xxx") and text.endswith("<repo>.git") and " ... " in text
    assert str(ConfigError("short; fix it")) == "short; fix it"


def test_an_ipv6_agent_address_is_written_as_a_url_writes_it() -> None:
    from git_credential_codestore.agent.discovery import Endpoint

    assert str(Endpoint.from_url("http://[::1]:8080")) == "http://[::1]:8080"
    assert str(Endpoint.from_url("https://agent.example:443")) == "https://agent.example:443"


def test_a_tokens_org_is_read_from_its_claims_whatever_their_order_or_case() -> None:
    import base64
    import json

    from git_credential_codestore.agent.client import issued_by
    from git_credential_codestore.secrets import Token

    def token(claims: dict[str, object]) -> Token:
        payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
        return Token(f"eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln", 1)

    assert issued_by(token({"iss": "acme", "sub": "x"}), "acme") and issued_by(token({"sub": "x", "iss": "Acme"}), "acme")
    assert not issued_by(token({"iss": "acme", "sub": "x"}), "evilorg") and not issued_by(token({"iss": ["acme"]}), "acme")
    assert not issued_by(Token("not.a.jwt", 1), "acme") and not issued_by(Token("garbage", 1), "acme")


def test_an_error_line_never_carries_what_a_terminal_would_act_on() -> None:
    # A server's or a sandbox's text inside an error (a git remote's message, an API
    # reason) reaches the user's terminal through the one-line error.
    from git_credential_codestore.errors import ConfigError

    text = str(ConfigError("git push failed: remote: \x1b]52;c;ZQ==\x07\x1b[31mfake\u202e\x9b"))
    assert not any(c in text for c in "\x1b\x07\u202e\x9b") and "\\x1b]52;c;ZQ==" in text


def test_every_json_parse_in_the_package_goes_through_jsontext() -> None:
    # JSON nested past the parser's stack raises RecursionError, which every `except
    # ValueError` meaning "not JSON" let through: an agent's 500 and log line per request,
    # a helper's crash on a proxy's answer. jsontext.loads raises ValueError for it.
    import pathlib
    import re

    from git_credential_codestore import jsontext

    root = pathlib.Path(jsontext.__file__).parent
    bare = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if path.name != "jsontext.py"
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bjson\.loads?\b", line)]
    assert bare == [], bare
    with pytest.raises(ValueError):
        jsontext.loads("[" * 30000 + "]" * 30000)
    assert jsontext.loads(b'{"a": [1]}') == {"a": [1]}
