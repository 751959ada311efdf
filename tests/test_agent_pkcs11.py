"""The agent signing through a PKCS#11 token (a real SoftHSM2), the key never in its memory."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from git_credential_codestore import hsm, keys, tokens
from git_credential_codestore.agent.client import AgentRefused, Endpoint, call
from tests.conftest import BIN, KID, ORG, OrgKey
from tests.realparts import P11KIT_PROXY, SOFTHSM_MODULE, P11KitServer, SoftHsm, raw_exchange
from tests.test_agent import Agent, mint, sandbox_env, start_agent
from tests.test_agent_front import token_request
from tests.test_agent_store import create


def keyless(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_PRIVATE_KEY")}


def generate(softhsm: SoftHsm, obj: str, kind: str) -> bytes:
    proc = subprocess.run([os.path.join(BIN, "codestore"), "key", "generate", "--pkcs11", softhsm.uri(obj), "--type", kind],
                          capture_output=True, text=True, env=softhsm.env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    return proc.stdout.encode()


def hsm_agent(tmp_path: Path, softhsm: SoftHsm, obj: str) -> Agent:
    return start_agent(tmp_path, "--key", softhsm.uri(obj), env=keyless(softhsm.env()))


def keypair_in_token(softhsm: SoftHsm, arguments: str) -> None:
    """A key pair made in the token by another tool: Session.generate_keypair(`arguments`)."""
    make = ("import os, pkcs11\n"
            "s = pkcs11.lib(os.environ['CODESTORE_PKCS11_MODULE']).get_token(token_label='codestore')"
            ".open(user_pin=os.environ['CODESTORE_PKCS11_PIN'], rw=True)\n"
            f"s.generate_keypair({arguments})\n"
            "s.close()\n")
    subprocess.run([os.path.join(BIN, "python"), "-c", make], check=True, env=softhsm.env(), timeout=60)


def serve_fails(tmp_path: Path, uri: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`agent serve --key URI`, expected to refuse at start (within `timeout`)."""
    return subprocess.run([os.path.join(BIN, "codestore"), "agent", "serve", "--key", uri, "--state-dir", str(tmp_path / "st"),
                           "--socket", str(tmp_path / "s" / "agent.sock")], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize(("kind", "alg"), [("ec", "ES256"), ("rsa", "RS256")])
def test_tokens_signed_in_the_token_verify_like_any_other(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm, kind: str, alg: str) -> None:
    public = generate(softhsm, f"org-{kind}", kind)
    a = hsm_agent(tmp_path, softhsm, f"org-{kind}")
    try:
        assert "key=pkcs11:token=codestore" in a.lines[-1]
        g = create(a)
        token = mint(sandbox_env(g["grant"], url=a.url))
        assert tokens.unverified_header(token)["alg"] == alg
        claims = tokens.verify(token, {KID: keys.load_public_key(public, "token")}, org=ORG)
        assert claims.repo == "team/app" and claims.scopes == ("git:read",)
    finally:
        a.stop()


def test_the_generated_key_is_sensitive_and_cannot_be_extracted(softhsm: SoftHsm) -> None:
    # Threat: the org key copied out of the token by anyone holding its PIN.
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    generate(softhsm, "org", "ec")
    os.environ["SOFTHSM2_CONF"] = softhsm.conf  # the module reads it when loaded
    session = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label="codestore").open(user_pin=softhsm.pin)
    try:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="org")
        assert key[Attribute.SENSITIVE] is True and key[Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
    finally:
        session.close()
        del os.environ["SOFTHSM2_CONF"]


def test_key_generate_never_overwrites_a_key_in_the_token(softhsm: SoftHsm) -> None:
    generate(softhsm, "org", "ec")
    for uri in (softhsm.uri("org"), softhsm.uri("org") + ";id=%01"):
        # With an id, the label alone matched nothing before: a second key "org" was made, and
        # `--key ...;object=org` (what the agent runs with) then matched two keys.
        proc = subprocess.run([os.path.join(BIN, "codestore"), "key", "generate", "--pkcs11", uri],
                              capture_output=True, text=True, env=softhsm.env(), timeout=60)
        assert proc.returncode == 1 and "already holds a key with object=org" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_several_keys_of_one_label_are_one_line_without_a_traceback(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # Session.get_key left its search open on "several match", and the search ended after
    # the session closed: "Exception ignored in ... get_objects" and a traceback on stderr.
    generate(softhsm, "org", "ec")
    keypair_in_token(softhsm, "pkcs11.KeyType.RSA, 2048, store=True, label='org', id=b'other'")
    proc = serve_fails(tmp_path, softhsm.uri("org"), keyless(softhsm.env()))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "several keys match" in proc.stderr, proc.stderr


def test_an_rsa_key_under_2048_bits_in_the_token_is_refused_at_start(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # A local RSA-1024 key is refused (keys.py); one in the token was served and signed RS256.
    keypair_in_token(softhsm, "pkcs11.KeyType.RSA, 1024, store=True, label='weak'")
    proc = serve_fails(tmp_path, softhsm.uri("weak"), keyless(softhsm.env()))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "RSA key of 1024 bits" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("uri", "env_drop", "message"),
    [
        ("pkcs11:token=codestore;object=org?pin-value=1234", (), "process listings"),
        ("pkcs11:token=codestore;object=org", ("CODESTORE_PKCS11_MODULE",), "no PKCS#11 module"),
        ("pkcs11:token=nosuch;object=org", (), "no PKCS#11 token nosuch"),
        ("pkcs11:token=codestore;object=missing", (), "no such key"),
        # An attribute codestore does not read was ignored: the PIN in argv, or a misspelt
        # token= that matched the first token found. Refused, never quoting a value.
        ("pkcs11:token=codestore;object=org?pin=1234", (), "attribute 'pin' after ? is not one codestore reads"),
        ("pkcs11:tokn=nosuch;object=org", (), "attribute 'tokn' before ? is not one codestore reads"),
        ("pkcs11:token=codestore;object=org;1234", (), "without '='"),
        ("pkcs11:token=codestore;object=org?pin-source=1234", ("CODESTORE_PKCS11_PIN",), "not the PIN"),  # the path not quoted
        # No PIN: the key is not visible without a login, and "no such key" named the wrong fault.
        ("pkcs11:token=codestore;object=org", ("CODESTORE_PKCS11_PIN",), "no PIN for the PKCS#11 token codestore"),
    ],
    ids=["pin-in-uri", "no-module", "no-token", "no-key", "pin-in-query", "misspelt-token", "no-equals", "pin-as-pin-source", "no-pin"],
)
def test_a_bad_key_uri_is_one_line_at_start(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm, uri: str, env_drop: tuple[str, ...], message: str) -> None:
    generate(softhsm, "org", "ec")
    env = {k: v for k, v in keyless(softhsm.env()).items() if k not in env_drop}
    proc = serve_fails(tmp_path, uri, env)
    assert proc.returncode in (1, 2) and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "1234" not in proc.stderr


@pytest.mark.parametrize("which", ["module-path", "pin-source"])
def test_a_pipe_named_as_the_module_or_the_pin_file_is_one_line_not_a_hang(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm,
                                                                          which: str) -> None:
    # The module's loader (dlopen) and a plain open() of the PIN file waited on a named
    # pipe's writer for ever: `agent serve` never started and never said why.
    generate(softhsm, "org", "ec")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    env = keyless(softhsm.env())
    if which == "module-path":
        uri, message = f"{softhsm.uri('org')}?module-path={pipe}", f"the PKCS#11 module {pipe} is not a regular file"
    else:
        del env["CODESTORE_PKCS11_PIN"]
        # No writer: read as empty, as every file codestore reads (files.read_bounded).
        uri, message = f"{softhsm.uri('org')}?pin-source=file:{pipe}", "the PKCS#11 PIN file that pin-source names is empty; fix pin-source"
    proc = serve_fails(tmp_path, uri, env, timeout=30)
    assert proc.returncode in (1, 2) and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_with_the_signer_gone_the_agent_refuses_in_one_line_and_recovers(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # Threat: a half-working agent handing out something it did not sign, or hanging.
    generate(softhsm, "org", "ec")
    a = hsm_agent(tmp_path, softhsm, "org")
    try:
        g = create(a)
        env = sandbox_env(g["grant"], sock=a.socket)
        mint(env)
        softhsm.away()
        with pytest.raises(AgentRefused) as refused:
            mint(env)
        assert "PKCS#11 token" in str(refused.value) and "\n" not in str(refused.value)
        status, ready = call(Endpoint("unix", a.socket), "GET", "/readyz")
        assert status == 503 and "PKCS#11" in str(ready["signer"])
        softhsm.back()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert mint(env)
                break
            except AgentRefused:
                assert time.monotonic() < deadline, "the agent did not recover when the token came back"
                time.sleep(0.1)
        assert call(Endpoint("unix", a.socket), "GET", "/readyz")[0] == 200
    finally:
        a.stop()


def test_a_network_hsm_that_stops_answering_is_refused_at_once_not_waited_on(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # Threat: an HSM that hangs without closing the connection (a paused server, a network
    # partition). PKCS#11 cannot cancel the call in progress, and the agent's one session
    # is behind a lock: every other token request, and /readyz, waited behind it forever.
    generate(softhsm, "org", "ec")
    server = P11KitServer(softhsm)
    a = start_agent(tmp_path, "--key", softhsm.uri("org"), env=keyless(server.env()))
    try:
        g = create(a)
        env = sandbox_env(g["grant"], sock=a.socket)
        mint(env)
        server.pause()
        try:
            threading.Thread(target=lambda: raw_exchange(a.socket, token_request(g["grant"]), timeout=30), daemon=True).start()
            time.sleep(hsm.SIGN_WAIT + 0.5)  # that request is in the token, and has been for longer than SIGN_WAIT
            t0 = time.monotonic()
            with pytest.raises(AgentRefused) as refused:
                mint(env)
            assert time.monotonic() - t0 < 2, "a token request waited behind the hung one"
            assert "has not answered" in str(refused.value) and "\n" not in str(refused.value)
            t0 = time.monotonic()
            status, ready = call(Endpoint("unix", a.socket), "GET", "/readyz")
            assert status == 503 and "has not answered" in str(ready["signer"]) and time.monotonic() - t0 < 2
        finally:
            server.resume()
        deadline = time.monotonic() + 10
        while call(Endpoint("unix", a.socket), "GET", "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "the agent did not recover when the HSM answered again"
            time.sleep(0.1)
        assert mint(env)
    finally:
        a.stop()
        server.stop()


def test_a_key_that_may_not_sign_is_one_line_at_start(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # A private object with CKA_SIGN false (made by another tool) must not reach the first
    # token request and fail there with a traceback.
    keypair_in_token(softhsm, "pkcs11.KeyType.RSA, 2048, store=True, label='nosign', private_template={pkcs11.Attribute.SIGN: False}")
    proc = serve_fails(tmp_path, softhsm.uri("nosign"), keyless(softhsm.env()))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "may not sign" in proc.stderr, proc.stderr


def test_workers_each_sign_through_their_own_session_on_the_token(tmp_path: Path, org_key: OrgKey, softhsm: SoftHsm) -> None:
    # The key stays in the token and every core mints: no PKCS#11 state crosses a fork (the
    # parent finalizes the module, each worker initializes its own), a worker started again
    # after a crash opens its own session too, and every token verifies.
    import signal

    from tests.test_agent_workers import _connections_to_each_worker, _until, _workers

    public = keys.load_public_key(generate(softhsm, "org", "ec"), "token")
    # Through p11-kit's proxy: SoftHSM2 alone would let a child use its parent's session.
    env = dict(keyless(softhsm.env()), CODESTORE_PKCS11_MODULE=P11KIT_PROXY)
    a = start_agent(tmp_path, "--key", softhsm.uri("org"), "--workers", "2", env=env)
    try:
        assert "workers=2" in a.lines[-1] and "key=pkcs11:" in a.lines[-1]
        g = create(a)
        env = sandbox_env(g["grant"], url=a.url)
        first = _workers(a.proc.pid)
        minted = [mint(env) for _ in range(30)]  # new connections, to whichever worker accepts
        os.kill(first[0], signal.SIGKILL)
        _until(lambda: len(_workers(a.proc.pid)) == 2 and first[0] not in _workers(a.proc.pid), "no worker took the dead one's place")
        minted += [mint(env) for _ in range(30)]
        conns = _connections_to_each_worker(a, 2)
        for conn in conns:  # each worker signs, on a connection it holds
            status, body = conn.ask("POST", "/v1/token", b"repo=team/app\nscopes=git:read\n", f"Grant {g['grant']}")
            assert status == 200, body
            minted.append(dict(line.split("=", 1) for line in body.decode().splitlines())["token"])
            conn.close()
        for token in minted:
            assert tokens.verify(token, {KID: public}, org=ORG).repo == "team/app"
    finally:
        a.stop()
    assert a.proc.returncode == 0
