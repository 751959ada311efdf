"""Tokens go to the configured server only, whatever git's configuration says about redirects.

The configured server (127.0.0.1) answers every request with a redirect to a second host
(127.0.0.2) that records the headers it receives and passes the request on to the dev
server, with a token of its own when it got none: a hostile host that answers the
advertisement without asking for credentials, so that git goes on with its work there
(curl drops a custom Authorization header when it follows a redirect to another host,
but git's `initial` mode then sends every later request to the new host itself). The
second host must never see an Authorization header.
"""

from __future__ import annotations

import http.client
import http.server
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ORG, DevServer, git, new_repo, run_cli
from tests.realparts import recording_host, serve_in_thread

REPO = "team/app"


@dataclass
class Hosts:
    configured: str  # what codestore is configured with: redirects everything
    elsewhere: str  # where the redirects point
    seen: list[str] = field(default_factory=list)  # Authorization headers that arrived elsewhere
    requests: list[str] = field(default_factory=list)


def _serve(handler: type[http.server.BaseHTTPRequestHandler], host: str) -> http.server.ThreadingHTTPServer:
    httpd = http.server.ThreadingHTTPServer((host, 0), handler)
    serve_in_thread(httpd)
    return httpd


@pytest.fixture
def hosts(dev_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    dev_server.create_repo(REPO)
    upstream = dev_server.url.split("://", 1)[1]
    own_auth = "Bearer " + dev_server.token(REPO, ["git:read", "git:write"])
    state = Hosts("", "")

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _relay(self) -> None:
            state.requests.append(self.path)
            for name, value in self.headers.items():
                if name.lower() in ("authorization", "proxy-authorization"):
                    state.seen.append(value)
            body = b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            elif self.headers.get("Content-Length"):
                body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding", "content-length")}
            headers.setdefault("Authorization", own_auth)
            conn = http.client.HTTPConnection(upstream, timeout=30)
            conn.request(self.command, self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = _relay  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    elsewhere = _serve(Elsewhere, "127.0.0.2")
    state.elsewhere = f"http://127.0.0.2:{elsewhere.server_address[1]}"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", state.elsewhere + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    configured = _serve(Redirect, "127.0.0.1")
    state.configured = f"http://127.0.0.1:{configured.server_address[1]}"
    monkeypatch.setenv("CODESTORE_BASE_URL", state.configured)
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    try:
        yield state
    finally:
        for httpd in (elsewhere, configured):
            httpd.shutdown()
            httpd.server_close()


def _keys(hosts: Hosts) -> dict[str, str]:
    """Every specificity of `http.<url>.followRedirects` git's urlmatch knows, by name."""
    base = hosts.configured
    return {
        "plain": "http.followRedirects",
        "host": f"http.{base}.followRedirects",
        "host/": f"http.{base}/.followRedirects",
        "prefix": f"http.{base}/team.followRedirects",
        "url": f"http.{base}/{REPO}.git.followRedirects",
        "url/": f"http.{base}/{REPO}.git/.followRedirects",
        "URL": f"http.{base.upper().replace('HTTP://', 'http://')}/{REPO}.git.followRedirects",
    }


def _configure(source: str, key: str, tmp_path: Path, repo: Path, hermetic: Path) -> tuple[list[str], dict[str, str]]:
    """Set key=true through `source`; returns extra git arguments and environment."""
    if source == "-c":
        return ["-c", f"{key}=true"], {}
    if source == "GIT_CONFIG_PARAMETERS":
        return [], {"GIT_CONFIG_PARAMETERS": f"'{key}'='true'"}
    if source == "GIT_CONFIG_COUNT":
        return [], {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": key, "GIT_CONFIG_VALUE_0": "true"}
    if source == "global":
        git("config", "--global", key, "true")
    elif source == "repository":
        git("config", key, "true", cwd=repo)
    elif source == "include":
        (tmp_path / "included").write_text("")
        git("config", "--file", str(tmp_path / "included"), key, "true")
        git("config", "--global", "include.path", str(tmp_path / "included"))
    elif source == "system":
        git("config", "--file", str(tmp_path / "system"), key, "true")
        return [], {"GIT_CONFIG_SYSTEM": str(tmp_path / "system"), "GIT_CONFIG_NOSYSTEM": "0"}
    return [], {}


def _run(hosts: Hosts, repo: Path, op: str, url: str, args: list[str], env: dict[str, str]) -> None:
    full_env = dict(os.environ, **env)
    if op == "fetch":
        git(*args, "fetch", url, "main", cwd=repo, check=False, env=full_env)
    else:
        git(*args, "push", url, "HEAD:refs/heads/redirected", cwd=repo, check=False, env=full_env)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    repo = tmp_path / "work"
    new_repo(repo, "f", "x\n", "c")
    return repo


CASES = [
    # Every specificity, from the command line (read last of all config) ...
    *[("-c", spec, "fetch") for spec in ("plain", "host", "host/", "prefix", "url", "url/", "URL")],
    # ... and the most specific one from every other source, for reads and pushes.
    *[(source, "url", "fetch") for source in ("GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "global", "repository", "include", "system")],
    *[(source, spec, "push") for source, spec in (("-c", "url"), ("repository", "url/"), ("GIT_CONFIG_PARAMETERS", "host"))],
]


@pytest.mark.parametrize("source,spec,op", CASES)
def test_no_redirect_setting_sends_the_remote_helpers_token_elsewhere(
    hosts: Hosts, work: Path, tmp_path: Path, hermetic: Path, source: str, spec: str, op: str
) -> None:
    # Threat: http.<url>.followRedirects=true (which git prefers to any plain key, in
    # any order) set anywhere, plus a redirecting front end: the token follows.
    args, env = _configure(source, _keys(hosts)[spec], tmp_path, work, hermetic)
    _run(hosts, work, op, f"codestore://{ORG}/{REPO}", args, env)
    assert hosts.seen == [], f"a token reached {hosts.elsewhere}: {hosts.requests}"


@pytest.mark.parametrize("source", ["-c", "repository"])
def test_no_proxy_setting_sends_the_remote_helpers_token_over_plain_http_elsewhere(
    hosts: Hosts, work: Path, tmp_path: Path, hermetic: Path, source: str
) -> None:
    # Threat: http.<url>.proxy (or http_proxy) pointing plain-http traffic, header and
    # all, at another host. A loopback server needs no proxy: the transport ignores them.
    key = f"http.{hosts.configured}/{REPO}.git.proxy"
    args, env = _configure(source, key, tmp_path, work, hermetic)
    args = [a.replace("=true", "=" + hosts.elsewhere) for a in args]
    if source == "repository":
        git("config", key, hosts.elsewhere, cwd=work)
    _run(hosts, work, "fetch", f"codestore://{ORG}/{REPO}", args, {**env, "http_proxy": hosts.elsewhere})
    assert hosts.seen == [], f"a token reached {hosts.elsewhere}: {hosts.requests}"


@pytest.mark.parametrize("op", ["fetch", "push"])
def test_no_redirect_setting_sends_the_credential_helpers_token_elsewhere(
    hosts: Hosts, work: Path, tmp_path: Path, hermetic: Path, op: str
) -> None:
    # Threat: as above, through the credential helper (which serves only the configured host).
    assert run_cli("codestore", "setup").returncode == 0
    args, env = _configure("-c", _keys(hosts)["url"], tmp_path, work, hermetic)
    _run(hosts, work, op, f"{hosts.configured}/{REPO}.git", args, env)
    assert hosts.seen == [], f"a token reached {hosts.elsewhere}: {hosts.requests}"


@pytest.mark.parametrize("source", ["-c", "repository"])
def test_a_remotes_own_proxy_setting_does_not_send_its_token_over_plain_http_elsewhere(
    hosts: Hosts, work: Path, tmp_path: Path, hermetic: Path, source: str
) -> None:
    # Threat: remote.<name>.proxy, which git applies after every http.* setting, so the
    # transport's pinned empty http.<url>.proxy did not hold: the token went in clear text
    # to the proxy host, from `git -c` or from the repository's .git/config.
    git("remote", "add", "origin", f"codestore://{ORG}/{REPO}", cwd=work)
    args: list[str] = []
    if source == "-c":
        args = ["-c", f"remote.origin.proxy={hosts.elsewhere}"]
    else:
        git("config", "remote.origin.proxy", hosts.elsewhere, cwd=work)
    git(*args, "fetch", "origin", cwd=work, check=False, env=dict(os.environ))
    assert hosts.seen == [], f"a token reached {hosts.elsewhere}: {hosts.requests}"


def test_a_host_resolved_elsewhere_by_configuration_does_not_get_the_remote_helpers_token(
    dev_server: DevServer, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: http.curloptResolve (from .git/config) sending the connection for the configured
    # host to another address, which got the header. The transport's configuration clears it.
    dev_server.create_repo(REPO)
    port = int(dev_server.url.rsplit(":", 1)[1])
    with recording_host("127.0.0.2", port) as (_, seen):  # the same port, another address
        monkeypatch.setenv("CODESTORE_BASE_URL", f"http://localhost:{port}")
        git("config", "http.curloptResolve", f"localhost:{port}:127.0.0.2", cwd=work)
        proc = git("ls-remote", f"codestore://{ORG}/{REPO}", cwd=work, check=False, env=dict(os.environ))
        assert seen == [], "the token reached the address the configuration resolved the host to"
        assert proc.returncode == 0, proc.stderr  # it went to the configured server instead
