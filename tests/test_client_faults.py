"""The helpers never hang on a slow agent, never read a file without limit, and never crash
on a bad agent address: each ends in one line that names the fix."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from git_credential_codestore import config, files
from git_credential_codestore.agent.client import (
    FAILOVER_REPLY_TIMEOUT,
    REPLY_TIMEOUT,
    AgentRefused,
    AgentUnavailable,
    Endpoint,
    exchange,
    read_grant,
)
from git_credential_codestore.errors import ConfigError, RemoteError, UsageError
from git_credential_codestore.secrets import Secret
from tests.conftest import BIN, ORG, OrgKey, run_cli
from tests.test_agent import REPO, Agent, mint, sandbox_env, verify


class Dripper:
    """Accepts connections and answers each with one byte every `interval` seconds."""

    def __init__(self, sock: socket.socket, interval: float = 0.2, total: float = 30.0) -> None:
        self.sock = sock
        self.interval, self.total = interval, total
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/x-codestore-lines\r\n\r\n" + b"x" * 1000
        end = time.monotonic() + self.total
        with conn:
            for byte in reply:
                if self.stop.is_set() or time.monotonic() > end:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(self.interval)


@pytest.fixture(params=["tcp", "unix"])
def dripping(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Endpoint]:
    if request.param == "tcp":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        ep = Endpoint("http", "127.0.0.1", sock.getsockname()[1])
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "agent.sock"))
        ep = Endpoint("unix", str(tmp_path / "agent.sock"))
    sock.listen(8)
    dripper = Dripper(sock)
    try:
        yield ep
    finally:
        dripper.stop.set()
        sock.close()


def test_an_agent_dripping_bytes_cannot_hold_an_exchange_past_its_deadline(dripping: Endpoint) -> None:
    # Threat: an agent (or anything between) sending a byte every few seconds keeps git
    # blocked for hours; each byte used to restart the per-read timeout.
    start = time.monotonic()
    with pytest.raises(AgentUnavailable, match="did not answer within 1s"):
        exchange(dripping, "POST", "/v1/token", b"repo=a\n", "text/x-codestore-lines", timeout=1.0)
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("dripping", ["unix"], indirect=True)
def test_git_is_not_held_by_a_dripping_agent_for_longer_than_the_deadline(dripping: Endpoint, org_key: OrgKey) -> None:
    # The whole path, through the installed credential helper, with the agent's grant: once,
    # on the agent's socket (15 s of waiting); the deadline of either kind is exchange()'s, above.
    env = dict(os.environ, CODESTORE_GRANT="g", CODESTORE_BASE_URL="https://acme.code.storage")
    if dripping.kind == "unix":
        env["CODESTORE_AGENT_SOCK"] = dripping.address
    else:
        env["CODESTORE_AGENT_URL"] = f"http://127.0.0.1:{dripping.port}"
    start = time.monotonic()
    proc = subprocess.run(
        [os.path.join(BIN, "git-credential-codestore"), "get"], input="protocol=https\nhost=acme.code.storage\npath=a.git\n\n",
        capture_output=True, text=True, env=env, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.stdout == "quit=1\n" and "did not answer within" in proc.stderr and proc.stderr.count("\n") == 1
    assert elapsed < 30, elapsed  # the deadline is 15 s; the drip would go on for 30 s and more


# ---------------------------------------------------------------- bounded reads


@pytest.mark.parametrize("what", ["CODESTORE_CONFIG", "CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_GRANT_FILE"])
def test_an_endless_file_is_refused_in_one_line_not_read_forever(what: str, org_key: OrgKey) -> None:
    # Threat: CODESTORE_CONFIG=/dev/zero (or a key or grant file that never ends) eating
    # all memory of the machine the helper runs on.
    env = dict(os.environ, CODESTORE_BASE_URL="https://acme.code.storage", CODESTORE_AGENT="off", **{what: "/dev/zero"})
    proc = subprocess.run(
        [os.path.join(BIN, "git-credential-codestore"), "get"], input="protocol=https\nhost=acme.code.storage\npath=a.git\n\n",
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.stdout == "quit=1\n" or what == "CODESTORE_CONFIG"
    assert "/dev/zero" in proc.stderr and "larger than" in proc.stderr and "Traceback" not in proc.stderr


def test_the_bounded_reader_reads_small_files_and_says_what_is_too_big(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    assert files.read_bounded(str(small), "the thing", limit=10) == b"x" * 10
    with pytest.raises(ConfigError, match=r"the thing .*small is larger than 9 bytes"):
        files.read_bounded(str(small), "the thing", limit=9)
    with pytest.raises(FileNotFoundError):
        files.read_bounded(str(tmp_path / "missing"), "the thing")


def test_config_and_grant_files_go_through_the_bounded_reader(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than"):
        config.load({"CODESTORE_CONFIG": "/dev/zero"})
    with pytest.raises(ConfigError, match="larger than"):
        read_grant({"CODESTORE_GRANT_FILE": "/dev/zero"})


# ---------------------------------------------------------------- a bad agent address


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1", "http://[::1]:-1", "http://127.0.0.1:", "https://h:65536",
     ",,,", " , ", "https://a..b:8765,http://127.0.0.1:1", "http://127.0.0.1:1,admin:hunter2@agent.internal:8765"],
)
def test_a_bad_agent_url_is_a_usage_error_in_one_line_never_a_crash(url: str, org_key: OrgKey) -> None:
    env = dict(os.environ, CODESTORE_AGENT_URL=url, CODESTORE_BASE_URL="https://acme.code.storage")
    for argv, stdin in (
        (["git-credential-codestore", "get"], "protocol=https\nhost=acme.code.storage\npath=a.git\n\n"),
        (["codestore", "token", "team/app"], None),
    ):
        proc = run_cli(*argv, input=stdin, env=env)
        lines = [line for line in proc.stderr.splitlines() if line]
        assert len(lines) == 1 and "CODESTORE_AGENT_URL" in lines[0] and "internal error" not in lines[0], (argv, proc.stderr)
        assert "hunter2" not in proc.stderr
        if argv[0] == "codestore":
            assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        else:
            assert proc.stdout == "quit=1\n"
    # And git through the remote helper: one line, git's usual failure, no crash log.
    proc = subprocess.run(["git", "ls-remote", f"codestore://{ORG}/team/app"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "CODESTORE_AGENT_URL" in proc.stderr and "internal error" not in proc.stderr


def test_endpoint_from_url_names_the_setting_and_the_form() -> None:
    with pytest.raises(UsageError, match=r"CODESTORE_AGENT_URL .* port .* http\(s\)://HOST:PORT"):
        Endpoint.from_url("http://127.0.0.1:99999")


@pytest.mark.parametrize("url, says", [
    ("admin:hunter2@agent.internal:8765", "has no http:// or https://"),
    ("https:/admin:hunter2@agent.internal:8765", "has no http:// or https://"),
    ("//admin:hunter2@agent.internal:8765", "has no http:// or https://"),
    ("ftp://admin:hunter2@agent.internal", "not ftp://"),
    ("https://admin:hunter2@agent.internal:8765", "must not carry credentials"),
    ("https://agent.internal:8765/hunter2", "takes no path"),
    ("https://agent.internal:8765#hunter2", "takes no path"),
    ("http://::1:8080", "bad host or port"),
    ("https://:8765", "bad host or port"),
    ("http://127.0.0.1:0", "bad host or port"),
    ("https://a..b:8765", "bad host or port"),
    ("https://.example:8765", "bad host or port"),
    (f"https://{'x' * 64}.example:8765", "bad host or port"),
    ("https://a\u00e9..b:8765", "bad host or port"),
])
def test_a_bad_agent_url_is_named_for_its_fault_and_never_quoted_back(url: str, says: str) -> None:
    # Threat (a secret in git's output): a URL mistyped without its scheme was quoted back in
    # the error, the password of its userinfo with it. And a host IDNA cannot encode (a..b)
    # crashed the helper (UnicodeError is no OSError), port 0 became port 80, a path was
    # silently dropped, and a missing host was blamed on the scheme.
    with pytest.raises((UsageError, ConfigError)) as e:
        Endpoint.from_url(url)
    line = str(e.value)
    assert says in line and "CODESTORE_AGENT_URL" in line and "hunter2" not in line and "\n" not in line, line


def test_hosts_that_can_be_connected_to_are_taken() -> None:
    assert Endpoint.from_url("https://agent.example.:8765") == Endpoint("https", "agent.example.", 8765)
    assert Endpoint.from_url("https://b\u00fccher.example") == Endpoint("https", "b\u00fccher.example", 443)
    assert Endpoint.from_url(f"https://{'x' * 63}.example/") == Endpoint("https", f"{'x' * 63}.example", 443)
    assert Endpoint.from_url("http://[::1]:8080") == Endpoint("http", "::1", 8080)


def test_a_replica_that_dies_with_the_request_in_hand_is_passed_over_for_the_next(agent: Agent, org_key: OrgKey) -> None:
    # Threat (availability): SIGKILL between a helper's request and the agent's answer
    # left the helper with an empty reply, read as "not HTTP", and git failed although
    # the next replica was up (test_helpers_fail_over_when_a_replica_is_killed_mid_load
    # caught it under load).
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    closer = Replying(sock, b"")  # reads the request and closes without a word: an agent killed mid-request
    try:
        ep = Endpoint("http", "127.0.0.1", sock.getsockname()[1])
        with pytest.raises(AgentUnavailable, match="closed the connection without answering"):
            exchange(ep, "POST", "/v1/token", b"repo=team/app\n", None)
        grant = agent.grant("--repo", REPO)["grant"]
        env = sandbox_env(grant, url=f"http://127.0.0.1:{ep.port},{agent.url}")
        assert verify(mint(env), org_key).repo == REPO
        assert closer.served == 2  # asked first, passed over
    finally:
        sock.close()


class Replying(Dripper):
    """Accepts connections, reads each request and sends `reply` (None: never answers, as a stopped replica)."""

    def __init__(self, sock: socket.socket, reply: bytes | None) -> None:
        self.reply, self.served = reply, 0
        super().__init__(sock)

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
            except OSError:
                return
            self.served += 1
            if self.reply is None:
                self.stop.wait(30)
                return
            conn.sendall(self.reply)


@contextlib.contextmanager
def replying(reply: bytes | None) -> Iterator[tuple[Replying, str]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    fake = Replying(sock, reply)
    try:
        yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        fake.stop.set()
        sock.close()


def _reply(status: str, body: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-type: text/x-codestore-lines\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


def _other_orgs_token() -> bytes:
    import base64

    claims = base64.urlsafe_b64encode(b'{"iss":"evil","sub":"x","repo":"team/app","scopes":["git:read"],"iat":1,"exp":9999999999}').rstrip(b"=")
    return b"token=eyJhbGciOiJFUzI1NiJ9." + claims + b".c2ln\nexpires_at=9999999999\n"


STORE_AWAY = _reply("503 Service Unavailable", b"error=the grant store is not answering; refusing to mint under a grant until it is back\n")


@pytest.mark.parametrize("reply", [
    _reply("503 Busy"),  # the agent's front over its connection cap
    STORE_AWAY,
    _reply("503 Service Unavailable", b"error=cannot write the audit log /dev/full (No space left on device); nothing was minted\n"),
    _reply("500 Internal Server Error", b"error=internal error\n"),
    _reply("502 Bad Gateway"),  # a proxy in front of a replica that is gone
    b"\x15\x03\x01\x00\x02\x02\x50",  # not HTTP (a TLS alert: an https port named as http)
    _reply("200 OK", b"<html>captive portal</html>"),  # not the agent's line format
    _reply("200 OK"),  # no token
    b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
    _reply("404 Not Found", b"<html>no such page</html>"),  # a proxy's 404: no reason of the agent's
    _reply("200 OK", _other_orgs_token()),  # an agent of another org
    b"HTTP/1.1 200 OK\r\ncontent-type: text/x-codestore-lines\r\ncontent-length: 900\r\n\r\ntoken=eyJhbGciOiJFUzI1NiJ9.eyJ",  # cut short
], ids=["busy", "store-away", "audit-unwritable", "internal-error", "bad-gateway", "not-http",
        "html-200", "empty-200", "redirect", "proxy-404", "other-org", "cut-short"])
def test_an_answer_other_than_the_agents_refusal_is_passed_over_for_the_next_replica(agent: Agent, org_key: OrgKey, reply: bytes) -> None:
    # Threat (availability): the first replica answering 503 (its store or signer away, its
    # audit log unwritable, busy) failed git, although the next replica was up: only a
    # replica that did not answer at all was passed over. Only the agent's own refusal of
    # the request (a 4xx with its reason) is final; a captive portal, a redirect, a proxy's
    # page, a reply cut short or another org's agent stopped failover too.
    grant = agent.grant("--repo", REPO)["grant"]
    with replying(reply) as (fake, url):
        env = sandbox_env(grant, url=f"{url},{agent.url}")
        assert verify(mint(env), org_key).repo == REPO
        assert fake.served == 1
        if reply != _reply("200 OK"):  # an empty 200 is a JSON call's empty object: the agent's, as far as it can tell
            # The JSON calls (doctor's grant check, the audit query) walk the replicas alike:
            # `codestore doctor` failed on a load balancer's 502 page with the next replica up.
            assert _own_grant(env)["id"] == str(grant).split("_")[1]  # type: ignore[index]
            assert fake.served == 2


def test_a_refusal_of_the_request_itself_is_every_replicas_answer_and_final(agent: Agent) -> None:
    grant = agent.grant("--repo", REPO)["grant"]
    with replying(_reply("403 Forbidden", b"error=the grant does not cover team/other\n")) as (first, url), \
            replying(None) as (second, other):
        with pytest.raises(AgentRefused, match="does not cover team/other"):
            mint(sandbox_env(grant, url=f"{url},{other}"))
        assert (first.served, second.served) == (1, 0)


def test_when_every_replica_fails_the_first_ones_reason_is_the_line(agent: Agent) -> None:
    grant = agent.grant("--repo", REPO)["grant"]
    with replying(STORE_AWAY) as (first, url), replying(_reply("503 Busy")) as (second, other):
        with pytest.raises(AgentRefused, match="the grant store is not answering") as e:
            mint(sandbox_env(grant, url=f"{url},{other}"))
        assert "\n" not in str(e.value) and (first.served, second.served) == (1, 1)
    with replying(_reply("503 Busy")) as (_, url):  # a bare 503 names what to do, not only "HTTP 503"
        with pytest.raises(AgentRefused, match=r"answered HTTP 503 and said no more; it may be busy: try again; check: codestore agent status"):
            mint(sandbox_env(grant, url=url))
    # A load balancer's own page, with no replica behind it: its status, not "an unreadable reply".
    with replying(_reply("503 Service Unavailable", b"<html><body>No healthy upstream</body></html>")) as (_, url):
        with pytest.raises(AgentRefused, match=r"answered HTTP 503 and said no more; it may be busy: try again"):
            mint(sandbox_env(grant, url=url))


def _own_grant(env: dict[str, str]) -> object:
    from git_credential_codestore.agent.client import AgentSource

    return AgentSource.from_env(config.load(env), env).own_grant()


@pytest.mark.parametrize("ask", [mint, _own_grant], ids=["token", "json-call"])
def test_a_list_of_silent_replicas_costs_no_more_than_one_silent_agent(agent: Agent, monkeypatch: pytest.MonkeyPatch,
                                                                        ask: Callable[[dict[str, str]], object]) -> None:
    # Each silent replica cost FAILOVER_REPLY_TIMEOUT (3 s) and the last REPLY_TIMEOUT (15 s):
    # ten listed, a git request waited 42 s before it failed. The whole failover now ends
    # within REPLY_TIMEOUT, and says which replicas it did not get to: for a token, and for
    # the JSON calls (doctor's grant check, the audit query), which walk them alike.
    from git_credential_codestore.agent import client

    monkeypatch.setattr(client, "REPLY_TIMEOUT", 2.0)
    monkeypatch.setattr(client, "FAILOVER_REPLY_TIMEOUT", 0.6)
    grant = agent.grant("--repo", REPO)["grant"]
    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(replying(None)) for _ in range(6)]
        urls = [url for _, url in silent]
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable) as e:
            ask(sandbox_env(grant, url=",".join(urls)))
        took = time.monotonic() - t0
    assert 2.0 <= took < 2.5, took  # not 5 x 0.6 + 2 = 5 s
    assert [fake.served for fake, _ in silent] == [1, 1, 1, 1, 0, 0]
    assert f"{urls[4]}, {urls[5]} not asked" in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_a_replica_that_accepts_and_never_answers_costs_seconds_not_the_whole_deadline(agent: Agent, org_key: OrgKey) -> None:
    # A stopped (SIGSTOP) or wedged replica accepts connections and never answers: each
    # git request waited the whole 15 s reply deadline before the next replica was asked.
    grant = agent.grant("--repo", REPO)["grant"]
    with replying(None) as (fake, url):
        t0 = time.monotonic()
        assert verify(mint(sandbox_env(grant, url=f"{url},{agent.url}")), org_key).repo == REPO
        took = time.monotonic() - t0
        assert fake.served == 1 and FAILOVER_REPLY_TIMEOUT <= took < REPLY_TIMEOUT, took


@pytest.mark.parametrize("content", [
    '{\n "grant": "csg_abc123_secret"\n}\n',  # the saved `grant create --json` output
    "# for the sandbox\ncsg_abc123_secret\n",
    "csg_abc123_secret\r\nX-Evil: injected",
    "csg_abc123 secret",
    "csg_ab\u00e7123_secret",
    "csg_" + "x" * 300,
])
def test_a_grant_that_is_not_one_header_token_is_refused_before_any_request(tmp_path: Path, content: str) -> None:
    # Threat: a grant file with more than the secret in it sent its other lines to the agent
    # as headers of their own (X-Evil: injected), then failed with "unreadable reply".
    path = tmp_path / "grant"
    path.write_text(content)
    for env in ({"CODESTORE_GRANT_FILE": str(path)}, {"CODESTORE_GRANT": content}):
        with pytest.raises(ConfigError, match="does not hold one grant secret") as e:
            read_grant(env)
        assert "\n" not in str(e.value) and "secret\n" not in str(e.value) and "csg_abc" not in str(e.value)


def test_no_header_line_break_reaches_the_agent_whatever_the_caller(tmp_path: Path) -> None:
    with replying(_reply("200 OK")) as (fake, url):
        with pytest.raises(ConfigError, match="line break in a header"):
            exchange(Endpoint.from_url(url), "POST", "/v1/token", b"", None, grant=Secret("csg_a_b\r\nX-Evil: injected"))
        assert fake.served == 0


def test_a_token_of_the_agents_org_is_never_handed_over_for_another_orgs_host(agent: Agent, org_key: OrgKey, tmp_path: Path) -> None:
    # Threat: a sandbox configured only by CODESTORE_AGENT_URL and its grant takes the org
    # from the URL git is given; a prompt-injected agent naming codestore://evilorg/...
    # had the acme token minted and handed to git for evilorg's host.
    grant = agent.grant("--repo", REPO)["grant"]
    home = tmp_path / "sandbox-home"  # no config.toml: the two documented variables only
    home.mkdir()
    env = {k: v for k, v in sandbox_env(grant, url=agent.url).items() if k not in ("CODESTORE_ORG", "CODESTORE_BASE_URL")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), GIT_TRACE_CURL=str(tmp_path / "curl.trace"))
    proc = subprocess.run(["git", "ls-remote", "codestore://evilorg/team/app"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "mints for another org than 'evilorg'" in proc.stderr, proc.stderr
    assert "eyJ" not in proc.stderr and not (tmp_path / "curl.trace").exists()  # nothing sent to evilorg's host
    # The agent's own org is served as before.
    assert verify(mint(dict(env, CODESTORE_ORG=ORG)), org_key).repo == REPO


class Scripted(Replying):
    """Answers its connections in turn from `replies` (None: never answers)."""

    def __init__(self, sock: socket.socket, replies: list[bytes | None]) -> None:
        self.replies = replies
        super().__init__(sock, None)

    def _drip(self, conn: socket.socket) -> None:
        self.reply = self.replies[min(self.served, len(self.replies) - 1)]
        super()._drip(conn)


@pytest.mark.parametrize("local_key", [True, False])
def test_the_owners_agent_that_does_not_answer_costs_seconds_before_the_local_key(org_key: OrgKey, local_key: bool) -> None:
    # A stopped (SIGSTOP) or wedged agent at the owner's default socket held every git
    # request for the whole 15 s reply deadline before the local key signed.
    from git_credential_codestore.agent import discovery

    env = dict(os.environ)
    if not local_key:
        env.pop("CODESTORE_PRIVATE_KEY_FILE")
    path = discovery.default_socket(env)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(8)
    # Silent at first; asked again (no key here to sign instead), it refuses.
    fake = Scripted(sock, [None, _reply("403 Forbidden", b"error=not today\n")])
    try:
        t0 = time.monotonic()
        if local_key:
            assert verify(mint(env), org_key).repo == REPO
        else:
            with pytest.raises(AgentRefused, match="not today"):
                mint(env)
        took = time.monotonic() - t0
        assert FAILOVER_REPLY_TIMEOUT <= took < REPLY_TIMEOUT and fake.served == (1 if local_key else 2), (took, fake.served)
    finally:
        fake.stop.set()
        sock.close()
        os.unlink(path)


@pytest.mark.parametrize("var, value, says", [
    ("CODESTORE_PRIVATE_KEY", "notakey", "is not an unencrypted PEM private key"),
    ("CODESTORE_PRIVATE_KEY_FILE", "/nonexistent/org.pem", "/nonexistent/org.pem does not exist"),
])
def test_a_bad_key_named_here_is_reported_as_itself_not_as_the_agents_mismatch(agent: Agent, var: str, value: str, says: str) -> None:
    # The owner's agent holds the org key; the environment names another, broken one. The
    # agent's "configured differently (key)" hid what was wrong: the key named here.
    env = {k: v for k, v in os.environ.items() if k not in ("CODESTORE_PRIVATE_KEY", "CODESTORE_PRIVATE_KEY_FILE")}
    env.update({var: value, "CODESTORE_AGENT_SOCK": agent.socket})
    proc = run_cli("codestore", "token", REPO, env=env)
    assert proc.returncode == 1 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_reply_cut_short_is_never_taken_for_a_token(agent: Agent) -> None:
    grant = agent.grant("--repo", REPO)["grant"]
    cut = b"HTTP/1.1 200 OK\r\ncontent-type: text/x-codestore-lines\r\ncontent-length: 900\r\n\r\ntoken=eyJhbGciOiJFUzI1NiJ9.eyJpc3Mi.c2ln\nexpires_at=17"
    with replying(cut) as (_, url):
        with pytest.raises(RemoteError, match="cut short"):
            mint(sandbox_env(grant, url=url))


def test_with_every_replica_unreachable_the_line_says_why_the_first_was(tmp_path: Path, refused_port: int) -> None:
    env = sandbox_env("csg_abc123_x", url=f"https://127.0.0.1:{refused_port},http://127.0.0.1:{refused_port}",
                      CODESTORE_AGENT_CA=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(AgentUnavailable, match=r"no codestore agent answered at any of .*; the first: cannot use CODESTORE_AGENT_CA .*missing-ca.pem"):
        mint(env)


@pytest.mark.parametrize("ca", ["missing", "directory", "not-pem", "fifo"])
def test_a_bad_agent_ca_is_one_line_and_the_next_replica_is_asked(agent: Agent, org_key: OrgKey, tmp_path: Path, ca: str) -> None:
    # It was an internal error (exit 3) that stopped failover, and a FIFO held git forever.
    path = tmp_path / "ca.pem"
    if ca == "directory":
        path.mkdir()
    elif ca == "not-pem":
        path.write_text("not a certificate\n")
    elif ca == "fifo":
        os.mkfifo(path)
    grant = agent.grant("--repo", REPO)["grant"]
    env = sandbox_env(grant, url=f"https://127.0.0.1:1,{agent.url}", CODESTORE_AGENT_CA=str(path))
    assert verify(mint(env), org_key).repo == REPO
    proc = run_cli("codestore", "token", REPO, env=sandbox_env(grant, url="https://127.0.0.1:1", CODESTORE_AGENT_CA=str(path)), timeout=30)
    assert proc.returncode == 1 and "cannot use CODESTORE_AGENT_CA" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_trace_or_identity_file_that_is_a_pipe_never_holds_git(org_key: OrgKey, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = run_cli("git-credential-codestore", "get", input=f"protocol=https\nhost={ORG}.code.storage\npath=team/app.git\n\n",
                   env=dict(os.environ, CODESTORE_TRACE=str(fifo)), timeout=30)
    assert proc.returncode == 0 and "cannot write the trace file" in proc.stderr, proc.stderr
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes
    try:
        env = {k: v for k, v in os.environ.items() if k != "CODESTORE_PRIVATE_KEY_FILE"}
        env.update(CODESTORE_IDENTITY_TOKEN_FILE=str(fifo), CODESTORE_AGENT_URL="http://127.0.0.1:1")
        proc = run_cli("codestore", "token", REPO, env=env, timeout=30)
        assert proc.returncode == 1 and "nothing more came from CODESTORE_IDENTITY_TOKEN_FILE" in proc.stderr, proc.stderr
    finally:
        os.close(writer)
