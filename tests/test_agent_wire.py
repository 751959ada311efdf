"""POST /v1/token's one wire format: git's key=value lines, both ways."""

from __future__ import annotations

import pytest

from git_credential_codestore.agent import wire
from git_credential_codestore.agent.client import Endpoint, exchange
from git_credential_codestore.errors import ProtocolError
from git_credential_codestore.secrets import Secret
from git_credential_codestore.vocab import TokenRequest
from tests.test_agent import REPO, Agent


def test_a_request_round_trips_to_the_one_request_type() -> None:
    request = TokenRequest(
        "team/app", ("git:read", "git:write"), True, 120,
        [("refs/heads/main", ["no-push"]), ("refs/heads/f/*", ["no-force-push", "no-push"])],
        "credential", True,
    )
    body = wire.encode_request(request, {"org": "acme", "kid": None, "key": "file:/k", "sub": "me"})
    assert wire.decode_request(body) == (request, {"org": "acme", "key": "file:/k", "sub": "me"})


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"repo=a\nrepo=b\n", "twice"),
        (b"repo\n", "not key=value"),
        (b"=x\n", "not key=value"),
        (b"repo=a\x1b[2J\n", "not key=value"),
        (b"admin=1\n", "unknown field"),
        (b"owner.password=x\n", "unknown field"),
        (b"ephemeral=yes\n", "0 or 1"),
        (b"ttl=-5\n", "whole number"),
        (b"ttl=99999999999\n", "whole number"),
        (b"ref=refs/heads/main\n", "OPS:PATTERN"),
        (b"\xff\n", "UTF-8"),
        (b"a=1\n" * (wire.MAX_LINES + 1), "more than"),
    ],
)
def test_malformed_lines_are_refused_not_skipped(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        wire.decode_request(body)


def test_values_with_line_breaks_cannot_be_encoded() -> None:
    # Threat: a value smuggling a second field (say `narrow=0` or an owner key) into the request.
    with pytest.raises(ProtocolError):
        wire.encode({"repo": "a\nscopes=git:write"})


def test_the_agent_answers_a_malformed_line_request_with_400_and_one_line(agent: Agent) -> None:
    status, body = exchange(Endpoint("unix", agent.socket), "POST", "/v1/token", b"repo=a\nrepo=b\n", wire.CONTENT_TYPE)
    assert status == 400 and wire.decode(body)["error"] == "bad token request: repo appears twice"
    # ...and keeps serving.
    ok_status, ok = exchange(Endpoint("unix", agent.socket), "POST", "/v1/token",
                             wire.encode_request(TokenRequest(REPO, ("git:read",), purpose="test")),
                             wire.CONTENT_TYPE)
    assert ok_status == 200, ok


def test_line_requests_are_accepted_only_for_minting(agent: Agent) -> None:
    # Threat: admin endpoints reached through a second, less-tested body parser.
    status, body = exchange(Endpoint("unix", agent.socket), "POST", "/v1/grants", b"repos=*\n", wire.CONTENT_TYPE)
    assert status == 415


def test_a_grant_holder_cannot_claim_owner_fields_in_lines(agent: Agent) -> None:
    # Threat: a grant holder adding owner.* lines to be treated as the owner.
    g = agent.grant("--repo", REPO)
    body = wire.encode_request(TokenRequest(REPO, ("git:read", "git:write"), purpose="test"),
                              {"org": "acme", "kid": "k1", "key": "x", "sub": "owner"})
    status, reply = exchange(Endpoint("unix", agent.socket), "POST", "/v1/token", body, wire.CONTENT_TYPE,
                             grant=Secret(str(g["grant"])))
    assert status == 403 and "does not allow git:write" in wire.decode(reply)["error"]


@pytest.mark.parametrize(
    "url,ok",
    [
        ("http://127.0.0.1:8765", True),
        ("http://localhost:8765", True),
        ("https://agent.example:8765", True),
        ("http://agent.example:8765", False),
        ("http://10.0.0.5:8765", False),
    ],
)
def test_a_grant_never_crosses_a_network_in_clear_text(url: str, ok: bool) -> None:
    # Threat: CODESTORE_AGENT_URL=http://remote-host sending the reusable grant unencrypted.
    from git_credential_codestore.errors import ConfigError

    if ok:
        assert Endpoint.from_url(url).kind in ("http", "https")
    else:
        with pytest.raises(ConfigError, match="plain http"):
            Endpoint.from_url(url)


def test_the_same_request_bytes_are_decided_afresh_for_each_caller(agent: Agent) -> None:
    # Threat: the agent remembers read request bodies (a pure function of the bytes); a
    # decision must never ride along: one body, each caller gets its own answer, in order.
    reader = Secret(str(agent.grant("--repo", REPO)["grant"]))
    made = agent.grant("--repo", REPO, "--scopes", "git:read,git:write")
    writer = Secret(str(made["grant"]))
    ep = Endpoint("unix", agent.socket)
    body = wire.encode_request(TokenRequest(REPO, ("git:read", "git:write"), purpose="test"))
    for _ in range(2):
        status, reply = exchange(ep, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=reader)
        assert status == 403 and "does not allow git:write" in wire.decode(reply)["error"]
        status, reply = exchange(ep, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=writer)
        assert status == 200 and wire.decode(reply)["scopes"] == "git:read git:write"
        status, _ = exchange(ep, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=Secret("csg_0000_nosuchgrant"))
        assert status == 401
    # A request that fails its checks is refused the same way each time, after who asks is known.
    bad = wire.encode_request(TokenRequest("not a repo id", ("git:read",), purpose="test"))
    for grant, expected in ((Secret("csg_0000_nosuchgrant"), 401), (writer, 400), (writer, 400)):
        assert exchange(ep, "POST", "/v1/token", bad, wire.CONTENT_TYPE, grant=grant)[0] == expected
    # Revoked after the body was read and remembered: refused.
    assert agent.cli("grant", "revoke", str(made["id"])).returncode == 0
    status, reply = exchange(ep, "POST", "/v1/token", body, wire.CONTENT_TYPE, grant=writer)
    assert status == 401 and "revoked" in wire.decode(reply)["error"]
