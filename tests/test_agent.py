"""The agent: grants, clamping, revocation, audit, socket security, robustness, load.

Every test runs the installed `codestore agent serve` as a real subprocess on a real
Unix socket (and 127.0.0.1 HTTP), with the org key in the agent's environment only;
the "sandbox" side is an environment with no key at all.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import pytest

from git_credential_codestore import config, keys, tokens
from git_credential_codestore.agent import wire
from git_credential_codestore.agent.client import AgentRefused, AgentUnavailable, Endpoint, call, exchange
from git_credential_codestore.secrets import Secret
from git_credential_codestore.source import get_token
from git_credential_codestore.vocab import TokenRequest
from tests.conftest import BIN, KID, ORG, OrgKey, run_cli, stop_process, wait_for
from tests.realparts import raw_exchange

REPO = "team/app"


@dataclass
class Agent:
    proc: subprocess.Popen[str]
    socket: str
    url: str
    env: dict[str, str]
    state_dir: Path
    audit_path: Path
    lines: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("codestore", *args, env=self.env)

    def grant(self, *args: str) -> dict[str, object]:
        proc = self.cli("grant", "create", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def stop(self) -> None:
        stop_process(self.proc)


def start_agent(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Agent:
    """`codestore agent serve` at the default socket plus 127.0.0.1:0; waits for `ready`."""
    env = dict(os.environ if env is None else env)
    state = tmp_path / "agent-state"
    audit = state / "audit.log"
    proc = subprocess.Popen(
        [os.path.join(BIN, "codestore"), "agent", "serve", "--listen", "127.0.0.1:0",
         "--state-dir", str(state), "--audit-log", str(audit), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )
    assert proc.stdout is not None
    lines = []
    for _ in range(4):
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("ready") or not line:
            break
    if not lines[-1].startswith("ready"):
        proc.kill()
        raise AssertionError(f"agent did not start: {lines} {proc.stderr.read() if proc.stderr else ''}")
    sock = lines[0].split("unix:", 1)[1].strip()
    url = next((ln.split()[1] for ln in lines if ln.startswith("serving http")), "")
    return Agent(proc, sock, url, env, state, audit, lines)


def sandbox_env(grant: object = None, *, sock: str | None = None, url: str | None = None, **extra: str) -> dict[str, str]:
    """An environment with no key anywhere: only the agent's address and a grant."""
    env = {k: v for k, v in os.environ.items() if k not in ("CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_PRIVATE_KEY")}
    if sock:
        env["CODESTORE_AGENT_SOCK"] = sock
    if url:
        env["CODESTORE_AGENT_URL"] = url
    if grant is not None:
        env["CODESTORE_GRANT"] = str(grant)
    env.update(extra)
    return env


class MintArgs(TypedDict, total=False):
    """mint()'s keyword arguments, for tables of requests."""

    repo: str
    scopes: tuple[str, ...]
    ephemeral: bool
    ttl: int | None


def mint(env: dict[str, str], repo: str = REPO, scopes: tuple[str, ...] = ("git:read",), ephemeral: bool = False, ttl: int | None = None) -> str:
    return get_token(TokenRequest(repo, scopes, ephemeral, ttl, purpose="test"), config.load(env), env).reveal()


def verify(token: str, org_key: OrgKey) -> tokens.Claims:
    pub = keys.load_public_key(org_key.public_path.read_bytes(), "test")
    return tokens.verify(token, {KID: pub}, org=ORG)


# -- a keyless sandbox gets narrow tokens ----------------------------------------------------


@pytest.mark.parametrize("transport", ["socket", "http"])
def test_keyless_sandbox_gets_a_token_clamped_to_its_grant(agent: Agent, org_key: OrgKey, transport: str) -> None:
    g = agent.grant("--repo", "team/*", "--scopes", "git:read git:write", "--max-ttl", "120", "--sub", "sandbox-7")
    env = sandbox_env(g["grant"], **({"sock": agent.socket} if transport == "socket" else {"url": agent.url}))
    claims = verify(mint(env, scopes=("git:read", "git:write"), ephemeral=True), org_key)
    assert claims.repo == REPO
    assert set(claims.scopes) == {"git:read", "git:write"}
    assert claims.sub == "sandbox-7"
    assert claims.exp - claims.iat == 120  # the grant's max, below the configured default


def test_tokens_carry_the_grants_ref_rules_ahead_of_the_requests(agent: Agent, org_key: OrgKey) -> None:
    # Threat: a sandbox overriding the grant's "no push to main" with its own first-match rule.
    g = agent.grant("--repo", REPO, "--scopes", "git:write", "--ref-policy", "refs/heads/main=no-push")
    request = TokenRequest(REPO, ("git:write",), refs=[("refs/heads/*", [])])
    status, body = exchange(Endpoint("unix", agent.socket), "POST", "/v1/token", wire.encode_request(request),
                            wire.CONTENT_TYPE, grant=Secret(str(g["grant"])))
    reply = wire.decode(body)
    assert status == 200, reply
    assert verify(str(reply["token"]), org_key).refs == [("refs/heads/main", ["no-push"]), ("refs/heads/*", [])]


def test_a_narrow_request_gets_what_the_grant_allows_and_no_more(agent: Agent, org_key: OrgKey) -> None:
    # Threat: a ceiling request ("at most read+write") widening a read-only grant.
    read_only = agent.grant("--repo", REPO)
    writer = agent.grant("--repo", REPO, "--scopes", "git:write")
    ceiling = TokenRequest(REPO, ("git:read", "git:write"), purpose="test", narrow=True)
    for g, expected in ((read_only, ("git:read",)), (writer, ("git:read", "git:write"))):
        env = sandbox_env(g["grant"], sock=agent.socket)
        assert verify(get_token(ceiling, config.load(env), env).reveal(), org_key).scopes == expected
    # Narrowing still refuses what the grant cannot give at all.
    env = sandbox_env(read_only["grant"], sock=agent.socket)
    with pytest.raises(AgentRefused, match="does not allow"):
        get_token(TokenRequest(REPO, ("repo:write",), narrow=True), config.load(env), env)


@pytest.mark.parametrize(
    ("grant_args", "request_kwargs", "reason"),
    [
        # Threat: a sandbox reaching a repository it was not given.
        (["--repo", "team/*"], {"repo": "other/secret"}, "does not cover repository"),
        # Threat: a read-only sandbox pushing.
        (["--repo", REPO], {"scopes": ("git:read", "git:write")}, "does not allow git:write"),
        # Threat: untrusted code writing to the default namespace.
        (["--repo", REPO, "--scopes", "git:write", "--ephemeral-only"], {"ephemeral": False}, "ephemeral-only"),
        # Threat: a long-lived token that outlives the sandbox's session.
        (["--repo", REPO, "--max-ttl", "60"], {"ttl": 600}, "exceeds grant"),
        # Threat: an org-wide listing token from a per-repository grant.
        (["--repo", "*"], {"repo": "org", "scopes": ("org:read",)}, "does not allow org:read"),
    ],
    ids=["other-repo", "write-on-read-grant", "default-namespace-on-ephemeral-only", "ttl-beyond-max", "org-read"],
)
def test_requests_beyond_the_grant_are_refused_with_a_reason_and_audited(
    agent: Agent, grant_args: list[str], request_kwargs: MintArgs, reason: str
) -> None:
    g = agent.grant(*grant_args)
    with pytest.raises(AgentRefused, match=reason):
        mint(sandbox_env(g["grant"], sock=agent.socket), **request_kwargs)
    last = agent.audit()[-1]
    assert last["event"] == "refuse" and last["grant"] == g["id"] and reason in str(last["reason"])


def test_revocation_takes_effect_at_once_and_survives_a_restart(tmp_path: Path, org_key: OrgKey) -> None:
    # Threat: a leaked grant that keeps working after its owner revoked it.
    a = start_agent(tmp_path)
    try:
        g = a.grant("--repo", REPO)
        keep = a.grant("--repo", REPO)
        env = sandbox_env(g["grant"], sock=a.socket)
        mint(env)
        assert a.cli("grant", "revoke", str(g["id"])).returncode == 0
        with pytest.raises(AgentRefused, match="revoked"):
            mint(env)
    finally:
        a.stop()
    b = start_agent(tmp_path)
    try:
        with pytest.raises(AgentRefused, match="revoked"):
            mint(env)
        mint(sandbox_env(keep["grant"], sock=b.socket))  # other grants survive too
        listed = {x["id"]: x for x in json.loads(b.cli("grant", "list", "--json").stdout)}
        assert listed[g["id"]]["state"] == "revoked" and listed[keep["id"]]["uses"] == 1
    finally:
        b.stop()


def test_an_expired_grant_is_refused(agent: Agent) -> None:
    # Threat: a grant handed to a sandbox for an hour still working next week.
    g = agent.grant("--repo", REPO, "--expires-in", "1")
    time.sleep(1.1)
    with pytest.raises(AgentRefused, match="expired"):
        mint(sandbox_env(g["grant"], sock=agent.socket))


def test_an_unknown_or_forged_grant_is_refused(agent: Agent) -> None:
    # Threat: guessing a grant, or keeping a real grant's id with a made-up secret.
    g = agent.grant("--repo", REPO)
    for fake in ("nonsense", f"csg_{g['id']}_" + "A" * 43):
        with pytest.raises(AgentRefused, match="unknown grant"):
            mint(sandbox_env(fake, sock=agent.socket))


def test_the_audit_log_records_mints_and_refusals_but_never_a_token_or_grant_secret(agent: Agent) -> None:
    # Threat: the audit log itself becoming a store of usable credentials.
    g = agent.grant("--repo", REPO, "--sub", "sb-1")
    env = sandbox_env(g["grant"], sock=agent.socket)
    token = mint(env)
    with pytest.raises(AgentRefused):
        mint(env, repo="other")
    entries = agent.audit()
    minted = [e for e in entries if e["event"] == "mint"]
    assert minted[-1] == {**minted[-1], "grant": g["id"], "sub": "sb-1", "repo": REPO, "scopes": ["git:read"], "result": "ok"}
    assert isinstance(minted[-1]["ttl"], int) and minted[-1]["time"]
    assert entries[-1]["result"] == "refused" and entries[-1]["repo"] == "other"
    text = agent.audit_path.read_text()
    assert token not in text and str(g["grant"]) not in text and "eyJ" not in text
    assert stat.S_IMODE(agent.audit_path.stat().st_mode) == 0o600


def test_grant_secrets_are_stored_only_as_hashes(agent: Agent) -> None:
    # Threat: reading the agent's state directory yields working grants.
    g = agent.grant("--repo", REPO)
    store = agent.state_dir / "agent.sqlite3"
    assert store.exists()
    for f in agent.state_dir.iterdir():  # the database, its write-ahead log, the audit log
        assert str(g["grant"]).encode() not in f.read_bytes(), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700


def test_grant_list_shows_use_count_and_last_use(agent: Agent) -> None:
    g = agent.grant("--repo", REPO)
    env = sandbox_env(g["grant"], sock=agent.socket)
    mint(env)
    mint(env)
    out = agent.cli("grant", "list").stdout
    row = next(line for line in out.splitlines() if line.startswith(str(g["id"])))
    assert " active " in row and " 2 " in row and time.strftime("%Y-%m-%d", time.gmtime()) in row


def test_grant_create_describes_the_grant_in_words(agent: Agent) -> None:
    proc = agent.cli("grant", "create", "--repo", REPO, "--repo", "team/other", "--scopes", "git:read git:write", "--max-ttl", "600")
    assert proc.returncode == 0, proc.stderr
    assert f"covers:  {REPO} team/other  scopes git:read git:write  max ttl 600s" in proc.stdout


# -- socket security and administration --------------------------------------------------------


def test_the_socket_is_0600_in_a_0700_directory(agent: Agent) -> None:
    # Threat: another local user connecting to the agent and minting as its owner.
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.socket)).st_mode) == 0o700
    assert agent.socket == os.path.join(os.environ["XDG_RUNTIME_DIR"], "codestore", "agent.sock")


def test_admin_calls_are_refused_to_grant_holders_everywhere(agent: Agent) -> None:
    # Threat: a sandbox creating itself a wider grant, or revoking others.
    g = agent.grant("--repo", REPO, "--own-socket")
    secret = Secret(str(g["grant"]))
    body = {"repos": ["*"], "scopes": "git:write"}
    for ep, grant in [
        (Endpoint("unix", agent.socket), secret),
        (Endpoint.from_url(agent.url), secret),
        (Endpoint.from_url(agent.url), None),
        (Endpoint("unix", str(g["socket"])), None),
    ]:
        for method, path in [("POST", "/v1/grants"), ("GET", "/v1/grants"), ("POST", f"/v1/grants/{g['id']}/revoke"), ("POST", "/v1/shutdown")]:
            status, reply = call(ep, method, path, body, grant=grant)
            assert status == 403, (ep, method, path, reply)
    assert agent.cli("grant", "list").stdout.count("active") == 1


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_a_peer_with_another_uid_is_refused_even_if_permissions_are_loosened(agent: Agent) -> None:
    # Threat: a mis-set mount or chmod exposing the socket to another user.
    os.chmod(os.path.dirname(agent.socket), 0o755)
    os.chmod(agent.socket, 0o666)
    # The temp dir's ancestors are private to root: the other user reaches the socket
    # through an inherited directory fd, as a bind mount into a container would.
    dirfd = os.open(os.path.dirname(agent.socket), os.O_RDONLY | os.O_DIRECTORY)
    body = b'{"repo": "team/app", "scopes": ["git:read"]}'
    request = b"POST /v1/token HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    code = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect('/proc/self/fd/{dirfd}/agent.sock'); s.sendall({request!r})\n"
        "out = b''\n"
        "while chunk := s.recv(65536): out += chunk\n"
        "sys.stdout.write(out.decode())"
    )
    try:
        proc = subprocess.run(["/usr/bin/python3", "-c", code], user=65534, pass_fds=(dirfd,), capture_output=True,
                              text=True, timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"})
    finally:
        os.close(dirfd)
    assert proc.stdout.startswith("HTTP/1.1 403"), proc.stdout + proc.stderr
    assert "peer uid 65534" in proc.stdout
    assert "token" not in proc.stdout


def test_a_dedicated_grant_socket_is_the_grant_and_disappears_on_revoke(agent: Agent, org_key: OrgKey) -> None:
    # Threat: a container with the socket mounted reaching beyond its grant or after revocation.
    g = agent.grant("--repo", REPO, "--own-socket", "--sub", "container-1")
    sock = str(g["socket"])
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    env = sandbox_env(sock=sock)  # no grant secret at all: the socket is the grant
    assert verify(mint(env), org_key).sub == "container-1"
    with pytest.raises(AgentRefused, match="does not allow"):
        mint(env, scopes=("git:write",))
    agent.cli("grant", "revoke", str(g["id"]))
    assert not os.path.exists(sock)
    with pytest.raises(AgentUnavailable):
        mint(env)


def test_listening_beyond_loopback_without_tls_is_refused(org_key: OrgKey) -> None:
    # Threat: grants crossing a network in clear text.
    proc = run_cli("codestore", "agent", "serve", "--listen", "0.0.0.0:0", timeout=30)
    assert proc.returncode == 1
    assert "--tls-cert" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("listen", ["127.0.0.1:\u00b2", "127.0.0.1:99999", "127.0.0.1", "[::1", "a:b", ":80"])
def test_a_bad_listen_address_is_one_line_and_a_usage_error(org_key: OrgKey, listen: str) -> None:
    # "\u00b2".isdigit() is true and int() of it raises: that was a traceback and exit 3.
    proc = run_cli("codestore", "agent", "serve", "--listen", listen, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("codestore: --listen wants HOST:PORT") and len(proc.stderr.strip().splitlines()) == 1


def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (its own CA) and its key, made at run time."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_https_listener_serves_grant_holders_who_trust_its_ca(tmp_path: Path, org_key: OrgKey) -> None:
    tls_pair(tmp_path)
    a = start_agent(tmp_path, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    try:
        assert a.url.startswith("https://127.0.0.1:")
        url = a.url.replace("127.0.0.1", "localhost")
        g = a.grant("--repo", REPO)
        assert mint(sandbox_env(g["grant"], url=url, CODESTORE_AGENT_CA=str(tmp_path / "cert.pem")))
        with pytest.raises(AgentUnavailable, match="CODESTORE_AGENT_CA"):
            mint(sandbox_env(g["grant"], url=url))  # an unknown CA is not trusted
    finally:
        a.stop()


# -- the owner's fast path, fallbacks and lifecycle --------------------------------------------


def test_the_owner_mints_through_an_agent_found_at_the_default_socket(agent: Agent, org_key: OrgKey) -> None:
    claims = verify(mint(dict(os.environ), scopes=("git:write",)), org_key)
    assert claims.scopes == ("git:write",)
    assert agent.audit()[-1]["via"] == "socket" and agent.audit()[-1]["grant"] is None


def test_an_agent_holding_another_key_is_not_used_and_the_local_key_signs(agent: Agent, tmp_path: Path) -> None:
    # Threat: a helper getting tokens signed with a key its configuration did not choose.
    from tests.conftest import make_key

    other = make_key(tmp_path, name="other")
    env = dict(os.environ, CODESTORE_PRIVATE_KEY_FILE=str(other.path))
    token = mint(env)
    pub = keys.load_public_key(other.public_path.read_bytes(), "test")
    assert tokens.verify(token, {KID: pub}, org=ORG).repo == REPO
    assert not [e for e in agent.audit() if e["event"] == "mint"]


def test_with_the_agent_down_the_owner_falls_back_to_the_local_key(org_key: OrgKey, tmp_path: Path) -> None:
    env = dict(os.environ, CODESTORE_AGENT_SOCK=str(tmp_path / "nothing.sock"))
    assert verify(mint(env), org_key).repo == REPO


def test_with_the_agent_down_a_sandbox_fails_fast_with_one_line_saying_how_to_start_it(tmp_path: Path) -> None:
    # Threat: git hanging in a headless sandbox.
    env = sandbox_env("csg_0_x", sock=str(tmp_path / "nothing.sock"), CODESTORE_ORG=ORG, CODESTORE_BASE_URL="http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable, match="codestore agent start") as e:
        mint(env)
    assert time.monotonic() - t0 < 2 and "\n" not in str(e.value)
    env["CODESTORE_AGENT_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    proc = subprocess.run(["git", "credential", "fill"], input=f"url=http://127.0.0.1:9/{REPO}.git\n\n", env=dict(env, GIT_CONFIG_COUNT="2",
                          GIT_CONFIG_KEY_0="credential.helper", GIT_CONFIG_VALUE_0="codestore",
                          GIT_CONFIG_KEY_1="credential.useHttpPath", GIT_CONFIG_VALUE_1="true"),
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0 and "codestore agent start" in proc.stderr and "password" not in proc.stdout


def test_agent_start_status_and_stop_manage_a_background_agent(org_key: OrgKey) -> None:
    start = run_cli("codestore", "agent", "start")
    try:
        assert start.returncode == 0 and "agent started" in start.stdout, start.stderr
        assert "already running" in run_cli("codestore", "agent", "start").stdout
        g = json.loads(run_cli("codestore", "grant", "create", "--repo", REPO, "--json").stdout)
        mint(sandbox_env(g["grant"]))  # the default socket, found with no address configured
        status = run_cli("codestore", "agent", "status")
        assert status.returncode == 0
        assert "1 active" in status.stdout and "1 minted" in status.stdout and "agent.sock" in status.stdout
    finally:
        stop = run_cli("codestore", "agent", "stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    down = run_cli("codestore", "agent", "status")
    assert down.returncode == 1 and "codestore agent start" in down.stderr


def test_helpers_start_an_agent_on_demand_which_then_serves_them(org_key: OrgKey) -> None:
    env = dict(os.environ, CODESTORE_AGENT="auto")
    mint(env)  # signed locally, and an agent is started for next time
    sock = os.path.join(os.environ["XDG_RUNTIME_DIR"], "codestore", "agent.sock")
    try:
        assert wait_for(lambda: os.path.exists(sock), timeout=20)
        assert wait_for(lambda: run_cli("codestore", "agent", "status").returncode == 0, timeout=20)
        mint(env)
        assert "1 minted" in run_cli("codestore", "agent", "status").stdout
    finally:
        run_cli("codestore", "agent", "stop")


# -- robustness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"garbage\r\n\r\n", b"400"),
        (b"POST /v1/token HTTP/1.1\r\nContent-Length: 8\r\n\r\n{not json", b"400"),
        (b"POST /v1/token HTTP/1.1\r\nContent-Length: 4\r\n\r\n[1,2]", b"400"),
        (b"POST /v1/token HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", b"413"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"POST /v1/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
        (b"POST /v1/token HTTP/1.1\r\nContent-Length: 40\r\n\r\n" + b"repo=../x\nscopes=git:read\n".ljust(40), b"400"),
        (b"GET /v1/../grants HTTP/1.1\r\n\r\n", b"404"),
    ],
    ids=["not-http", "bad-json", "not-an-object", "huge", "long-line", "chunked", "bad-repo", "odd-path"],
)
def test_malformed_requests_get_a_refusal_and_the_agent_keeps_serving(agent: Agent, payload: bytes, status: bytes) -> None:
    # Threat: one bad client crashing the agent for everyone.
    reply = raw_exchange(agent.socket, payload)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert b"error" in reply
    assert mint(dict(os.environ))
    assert agent.proc.poll() is None


def test_a_slow_client_does_not_stall_others(agent: Agent) -> None:
    # Threat: a client that connects and never finishes its request (slowloris).
    stalled = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(8)]
    for s in stalled:
        s.connect(agent.socket)
        s.sendall(b"POST /v1/token HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.monotonic()
    assert mint(dict(os.environ))
    assert time.monotonic() - t0 < 1.0
    for s in stalled:
        s.close()


def test_64_concurrent_clients_are_all_served(agent: Agent, org_key: OrgKey) -> None:
    g = agent.grant("--repo", "team/*")
    env = sandbox_env(g["grant"], sock=agent.socket)
    cfg = config.load(env)
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(64)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results.append(get_token(TokenRequest(f"team/r{i}", ("git:read",)), cfg, env).reveal())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 64
    assert {verify(t, org_key).repo for t in results} == {f"team/r{i}" for i in range(64)}


def _key_check(env: dict[str, str]) -> dict[str, Any]:
    proc = run_cli("codestore", "doctor", "--json", env=env)
    checks = json.loads(proc.stdout)["checks"]
    return next(c for c in checks if c["name"] == "key")


def test_doctor_in_a_grant_sandbox_checks_the_grant_without_minting_or_leaving_a_refusal(agent: Agent) -> None:
    # doctor asked the agent for a test token for a repository named doctor-check: outside
    # every grant, so it said FAIL in a sandbox set up right, and each run left a refusal
    # in the audit trail.
    g = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only")
    before = agent.audit()
    for env in (sandbox_env(g["grant"], url=agent.url), sandbox_env(g["grant"], sock=agent.socket)):
        check = _key_check(env)
        assert check["ok"], check
        assert f"grant {g['id']} (active)" in check["detail"] and f"git:read git:write on {REPO} (ephemeral only)" in check["detail"]
    assert agent.audit() == before  # nothing minted, nothing refused
    own = agent.grant("--repo", REPO, "--own-socket")  # the socket alone says whose grant it is
    assert f"grant {own['id']} (active)" in _key_check(sandbox_env(sock=str(own["socket"])))["detail"]


def test_doctor_in_a_sandbox_whose_grant_was_revoked_or_never_existed_fails_naming_why(agent: Agent) -> None:
    g = agent.grant("--repo", REPO)
    assert agent.cli("grant", "revoke", str(g["id"])).returncode == 0
    check = _key_check(sandbox_env(g["grant"], url=agent.url))
    assert not check["ok"] and f"grant {g['id']} (revoked)" in check["detail"] and "ask the grant's owner" in check["detail"]
    assert str(g["grant"]) not in check["detail"]
    unknown = "csg_" + "0" * 8 + "_" + "x" * 32
    check = _key_check(sandbox_env(unknown, url=agent.url))
    assert not check["ok"] and "unknown grant" in check["detail"] and unknown not in check["detail"], check


def test_the_owner_asking_for_its_own_grant_gets_none(agent: Agent) -> None:
    assert call(Endpoint("unix", agent.socket), "GET", "/v1/grant") == (200, {"grant": None})
