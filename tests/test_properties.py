"""Property tests over every client-side parser that reads untrusted input.

Each parser, fed anything at all, either returns a well-formed value or raises the one
expected error (a one-line CodestoreError), never another exception (which would be
exit 3 and a crash log), never a hang, and never an error message quoting a secret.
Bounded in examples and time so the suite stays fast; every example hypothesis once
found is kept with @example as a regression case.
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from git_credential_codestore import config, credential, gitenv, keys, lines, remotes, tokens, vocab
from git_credential_codestore.agent import client, wire
from git_credential_codestore.errors import CodestoreError, ConfigError, ProtocolError, RemoteError, TokenError
from git_credential_codestore.vocab import TokenRequest
from remote_helper import protocol

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SECRET = "eyJzZWNyZXQiOiJ2YWx1ZSJ9"  # what must never be echoed back

# Text made of the characters each format cares about, plus anything at all.
LINE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"=", b"\n", b"\r", b"\0", b"protocol", b"host", b"path", b"https", b"a", b"\xff", b"[]",
                              b"password", SECRET.encode(), b" ", b"\x1b"]), max_size=30).map(b"".join),
)


# ---------------------------------------------------------------- git's credential protocol


@FAST
@given(LINE_BYTES)
@example(b"password=" + SECRET.encode() + b"\x00\n")
@example(b"host=a\npassword\n")
def test_the_credential_parser_returns_fields_or_a_protocol_error_that_quotes_nothing(data: bytes) -> None:
    try:
        fields = credential.parse(data)
    except ProtocolError as e:
        assert SECRET not in str(e) and "\n" not in str(e)
        return
    assert all(k and "\n" not in k + v and "\0" not in k + v for k, v in fields.items())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30))
@example("token\x7f")
@example("a\u2028b\xa0c\x85")  # Unicode separators: not controls on the wire
@example("\x1f")
def test_the_wires_control_test_is_exactly_c0_and_del(text: str) -> None:
    # The fast path (ASCII: isprintable) must agree with the definition for every text.
    assert lines.has_control(text) == any(ord(c) < 32 or c == "\x7f" for c in text)


KEY = st.text(alphabet=st.characters(blacklist_characters="=\n\0\r", blacklist_categories=["Cs"]), min_size=1, max_size=20)
VALUE = st.text(alphabet=st.characters(blacklist_characters="\n\0", blacklist_categories=["Cs"]), max_size=40)


@FAST
@given(st.dictionaries(KEY, VALUE.filter(lambda v: not v.endswith("\r")), max_size=8))
def test_credential_fields_round_trip(fields: dict[str, str]) -> None:
    data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode() + b"\n"
    assert credential.parse(data) == fields


@FAST
@given(st.sampled_from(["get", "store", "erase", "bogus"]), LINE_BYTES)
@example("erase", b"protocol=https\nhost=acme.code.storage\nusername=t\npassword=eyJ.e30.x\n\n")
@example("erase", b"protocol=https\nhost=acme.code.storage\nusername=t\npassword=eyJhIjoxfQ.eyJleHAiOiJ4In0.x\n\n")
def test_the_credential_helper_answers_anything_without_crashing(operation: str, data: bytes) -> None:
    # No key anywhere: a `get` for our host must end in quit=1, never a traceback.
    env = {"CODESTORE_ORG": "acme", "CODESTORE_AGENT": "off", "CODESTORE_CONFIG": "/nonexistent",
           "HOME": os.environ["HOME"], "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    out, err = io.BytesIO(), io.BytesIO()
    assert credential.run([operation], io.BytesIO(data), out, err, env) in (0, 1)
    assert out.getvalue() in (b"", b"quit=1\n"), out.getvalue()
    assert b"internal error" not in err.getvalue() and SECRET.encode() not in err.getvalue()


# ---------------------------------------------------------------- the agent's wire format, client side


@FAST
@given(LINE_BYTES)
@example(b"eyJzZWNyZXQiOiJ2YWx1ZSJ9=")  # an unknown field's name was echoed in the error
@example(b"eyJzZWNyZXQiOiJ2YWx1ZSJ9=\neyJzZWNyZXQiOiJ2YWx1ZSJ9=")  # and a repeated one's
def test_wire_decoding_returns_fields_or_a_protocol_error(body: bytes) -> None:
    try:
        wire.decode_request(body)
    except ProtocolError as e:
        assert SECRET not in str(e)


SAFE = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters=":,"), min_size=1, max_size=20)


@FAST
@given(
    repo=SAFE, scopes=st.lists(SAFE, max_size=3), ephemeral=st.booleans(), narrow=st.booleans(),
    ttl=st.one_of(st.none(), st.integers(0, 10**8)), purpose=SAFE,
    refs=st.lists(st.tuples(SAFE, st.lists(SAFE, max_size=2)), max_size=3),
)
@example(repo="0", scopes=[], ephemeral=False, narrow=False, ttl=None, purpose="\x7f", refs=[])  # encode let DEL through
@example(repo="0", scopes=["\x85"], ephemeral=False, narrow=False, ttl=None, purpose="0", refs=[])  # split() on NEL
def test_token_requests_round_trip_through_lines(
    repo: str, scopes: list[str], ephemeral: bool, narrow: bool, ttl: int | None, purpose: str, refs: list[tuple[str, list[str]]]
) -> None:
    texts = [repo, purpose, *scopes, *(p for p, _ in refs), *(op for _, ops in refs for op in ops)]
    request = TokenRequest(repo, tuple(scopes), ephemeral, ttl, refs, purpose, narrow)
    try:
        body = wire.encode_request(request)
    except ProtocolError:
        # Refused at the source exactly when decoding would refuse it.
        assert any(ord(c) < 32 or c == "\x7f" for c in "".join(texts))
        return
    got, owner = wire.decode_request(body)
    assert owner == {}
    assert got._replace(refs=[(p, list(ops)) for p, ops in got.refs]) == request._replace(
        refs=[(p, list(ops)) for p, ops in refs]
    )


EP = client.Endpoint("unix", "/run/agent.sock")


@FAST
@given(st.one_of(st.binary(max_size=200), st.builds(
    lambda status, body: b"HTTP/1.1 " + status + b" X\r\n\r\n" + body,
    st.sampled_from([b"200", b"403", b"2000", b"\xb2\xb2\xb2", b"-20", b""]), LINE_BYTES,
)))
@example(b"HTTP/1.1 200 OK\r\n\r\ntoken=" + SECRET.encode() + b"\nexpires_at=\xc2\xb2\n")
@example(b"HTTP/1.1 \xd9\xa1\xd9\xa2\xd9\xa3 OK\r\n\r\n")
def test_an_agent_reply_gives_a_token_or_one_line_error(raw: bytes) -> None:
    # Threat: a hostile or broken agent crashing the helper (exit 3), or its reply
    # echoed (it may hold a token) into git's terminal.
    try:
        status, content = client.parse_reply(raw, EP)
        token = client.token_from_reply(status, content, EP)
    except RemoteError as e:  # AgentRefused/AgentMismatch are Remote/Policy errors too
        assert SECRET not in str(e)
        return
    except CodestoreError as e:
        assert SECRET not in str(e)
        return
    assert token.reveal() and token.expires_at >= 0


# ---------------------------------------------------------------- codestore:// URLs and the protocol


URLISH = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["codestore://", "codestore::", "https://", "http://", "acme", "acme.code.storage", "/",
                              "team", "app", "+ephemeral", ".git", "..", "@", ":", "?", "#", "%2F", "[::1]", ":99999",
                              "127.0.0.1", "\n", " ", "é"]), max_size=10).map("".join),
)


@FAST
@given(URLISH)
@example("https://acme.code.storage:99999/a.git")
@example("http://[::1/a.git")
def test_remote_urls_give_a_repository_on_the_configured_server_or_a_config_error(url: str) -> None:
    cfg = config.Config(org="acme")
    try:
        remote, _ = remotes.parse(url, cfg)
    except ConfigError:
        return
    # Threat: a URL that mints a token for one server and sends it to another.
    assert remote.https_url.startswith("https://acme.code.storage/")
    assert vocab.validate_repo_id(remote.repo) == remote.repo
    assert "@" not in remote.https_url


@FAST
@given(st.lists(st.one_of(
    st.sampled_from([b"capabilities", b"option progress true", b"option depth 1", b"option bogus", b"list for-push",
                     b"list", b"push refs/heads/a:refs/heads/a", b"stateless-connect git-upload-pack", b"connect x",
                     b"option cas refs/heads/a:" + b"0" * 40, b"", b"fetch 0 x"]),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
), max_size=12))
def test_the_protocol_answers_only_from_its_tables_or_stops_with_one_error(lines: list[bytes]) -> None:
    written: list[bytes] = []
    stream = io.BytesIO(b"".join(line + b"\n" for line in lines)).read
    reader = protocol.LineReader(stream)
    try:
        decision = protocol.negotiate(reader, written.append)
        if decision.command == b"list for-push":
            decision = protocol.after_advertisement(reader, written.append, decision)
    except ProtocolError:
        return
    assert decision.operation in ("read", "push", "end")
    caps = b"\n".join(protocol.CAPABILITIES) + b"\n\n"
    assert all(w in (caps, b"ok\n", b"unsupported\n", b"error invalid value\n") for w in written)


# ---------------------------------------------------------------- configuration


TOMLISH = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["org = ", '"acme"', "ttl = ", "30", "99999", "-1", "scopes = ", '"git:read git:write"',
                              "[repos.\"a/*\"]", "[repos]", "base_url = ", '"http://x"', '"https://h"', "\n", "[", "]",
                              "= ", "1.5", "true", "[[x]]", "ephemeral_scopes = ", '["git:read"]', "{ a = 1 }"]),
             max_size=20).map("".join),
)


@FAST
@given(TOMLISH)
@example('ttl = "²"\n')
@example("ttl = 1e400\n")
@example("ttl = true\n")
def test_any_config_file_loads_or_is_one_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = config.load({"CODESTORE_CONFIG": str(path)})
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert vocab.MIN_TTL <= cfg.ttl <= vocab.MAX_TTL
    assert set(cfg.scopes) <= set(vocab.SCOPES)


@FAST
@given(st.text(max_size=12))
def test_git_integer_reading_never_raises(value: str) -> None:
    number = gitenv.parse_int(value)
    assert number is None or -gitenv.INT_MAX <= number <= gitenv.INT_MAX
    assert gitenv.parse_bool(value) in (True, False, None)


# ---------------------------------------------------------------- JWT verification


Signer = tuple[tokens.PrivateKey, dict[str, tokens.PublicKey]]  # a key and the trusted map that verifies it


@pytest.fixture(scope="module")
def signer() -> Signer:
    key = keys.generate("ec")
    return key, {"k1": key.public_key()}


def _b64(obj: object) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8), st.floats(allow_nan=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8,
)
HEADERS = st.one_of(JSONISH, st.fixed_dictionaries({"alg": st.sampled_from(["ES256", "none", "HS256", "RS256", 1, None]),
                                                    "kid": st.one_of(st.just("k1"), JSONISH)}))
CLAIMS = st.one_of(JSONISH, st.fixed_dictionaries({
    "iss": st.one_of(st.just("acme"), JSONISH), "repo": JSONISH, "scopes": JSONISH,
    "iat": st.one_of(st.integers(-2**40, 2**40), JSONISH), "exp": st.one_of(st.integers(-2**40, 2**40), JSONISH),
    "refs": JSONISH,
}))


@FAST
@given(HEADERS, CLAIMS, st.binary(max_size=80))
def test_a_forged_token_is_refused_with_a_token_error(signer: Signer, header: object, claims: object, sig: bytes) -> None:
    # Threat: a token no registered key signed being accepted, or crashing the verifier.
    _, trusted = signer
    forged = f"{_b64(header)}.{_b64(claims)}.{_b64(sig)}"
    with pytest.raises(TokenError):
        tokens.verify(forged, trusted, org="acme")


@FAST
@given(st.integers(0, 10_000), st.sampled_from("AQgw_-9z"))
def test_a_changed_character_breaks_a_valid_token_or_changes_nothing(signer: Signer, at: int, char: str) -> None:
    key, trusted = signer
    token = tokens.mint(key, org="acme", repo="team/app", scopes=["git:read"], ttl=60, sub="t", kid="k1").reveal()
    original = tokens.verify(token, trusted, org="acme")
    i = at % len(token)
    changed = token[:i] + char + token[i + 1 :]
    try:
        claims = tokens.verify(changed, trusted, org="acme")
    except TokenError:
        return
    # Only a change base64 ignores (the unused low bits of a last character) may pass.
    assert claims == original
