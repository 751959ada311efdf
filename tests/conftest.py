"""Shared fixtures: a hermetic environment, an org key, and a running dev server.

Every test runs with its own HOME, XDG dirs and global git config, with no system git
config, no terminal prompts and a keyring backend that cannot touch a real keychain.
The installed entry points (`codestore`, `git-credential-codestore`,
`git-remote-codestore`) are found on PATH next to the Python running the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.test_agent import Agent

BIN = os.path.dirname(sys.executable)
ORG = "acme"
KID = "k1"
REAL_HOME = os.path.expanduser("~")


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME and git config per test; returns the HOME."""
    home = tmp_path / "home"
    home.mkdir()
    for k in list(os.environ):
        if k.startswith(("CODESTORE_", "GIT_", "XDG_")) or k in ("PYTHON_KEYRING_BACKEND", "SSH_AUTH_SOCK"):
            monkeypatch.delenv(k)
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
        "GIT_CONFIG_NOSYSTEM": "1",
        # `git config --system` (setup --system) writes here, never to this machine's /etc.
        "GIT_CONFIG_SYSTEM": str(tmp_path / "etc-gitconfig"),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        # keyring's fail backend: no test can read or write a real keychain.
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "PATH": BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
    }
    (tmp_path / "run").mkdir(mode=0o700)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n[protocol]\n\tversion = 2\n")
    return home


_USERS_BEFORE = pytest.StashKey[set[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the run itself, not one of pytest-xdist's workers
        session.config.stash[_USERS_BEFORE] = sandbox_users()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """As root, the sandbox tests create users (tests/sandboxes.py): once every worker has
    ended, the run removes the ones it created, and leaves the machine's own."""
    before = session.config.stash.get(_USERS_BEFORE, None)
    if before is not None and os.geteuid() == 0:
        remove_users(sandbox_users() - before)


@pytest.fixture(autouse=True, scope="session")
def real_home_untouched() -> Iterator[None]:
    """Fail loudly if any test wrote codestore state or git config into the real HOME."""
    watched = [
        os.path.join(REAL_HOME, ".gitconfig"),
        os.path.join(REAL_HOME, ".config", "codestore"),
        os.path.join(REAL_HOME, ".local", "share", "codestore"),
    ]
    before = {p: os.stat(p).st_mtime if os.path.exists(p) else None for p in watched}
    yield
    after = {p: os.stat(p).st_mtime if os.path.exists(p) else None for p in watched}
    assert before == after, f"a test touched the real home directory: {before} -> {after}"


@dataclass
class OrgKey:
    path: Path
    public_path: Path
    pem: str
    kid: str = KID
    org: str = ORG


def make_key(tmp_path: Path, kind: str = "ec", name: str = "org") -> OrgKey:
    from git_credential_codestore import keys

    key = keys.generate(kind)
    path = tmp_path / f"{name}.pem"
    pem = keys.private_pem(key).reveal()
    path.write_text(pem)
    path.chmod(0o600)
    pub = tmp_path / f"{name}.pub.pem"
    pub.write_text(keys.public_pem(key))
    return OrgKey(path, pub, pem)


@pytest.fixture
def org_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OrgKey:
    """An EC P-256 org key in a file, configured through the environment."""
    k = make_key(tmp_path)
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    monkeypatch.setenv("CODESTORE_PRIVATE_KEY_FILE", str(k.path))
    monkeypatch.setenv("CODESTORE_KID", KID)
    return k


@dataclass
class DevServer:
    url: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[str]
    key: OrgKey

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on, for a raw socket (realparts.raw_exchange)."""
        host, _, port = self.url.split("://", 1)[1].rpartition(":")
        return host, int(port)

    def stop(self) -> None:
        """Terminate (kill after 10 s), and close our ends of its pipes."""
        stop_process(self.proc)

    def requests(self) -> list[dict[str, Any]]:
        """The server's request log: one JSON object per request (never a token)."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def token(self, repo: str, scopes: list[str], ttl: int = 300) -> str:
        from git_credential_codestore import keys, tokens

        key = keys.parse_private_key(keys.Secret(self.key.pem), "test")
        return tokens.mint(key, org=ORG, repo=repo, scopes=scopes, ttl=ttl, sub="test", kid=KID).reveal()

    def api(self, method: str, path: str, token: str, body: Mapping[str, object] | None = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def create_repo(self, repo: str, default_branch: str = "main") -> str:
        status, body = self.api("POST", "/api/v1/repos", self.token(repo, ["repo:write"]), {"default_branch": default_branch})
        assert status in (200, 201), (status, body)
        return f"{self.url}/{repo}.git"


def start_dev_server(data_dir: Path, key: OrgKey, *extra: str, open_files: int | None = None) -> DevServer:
    """`codestore dev-server --port 0` prints `serving URL` on its first stdout line.
    `open_files`: its soft limit of open files (the shell's `ulimit -n`)."""
    from git_credential_codestore.processes import start_dev_server as start

    log_path = data_dir / "requests.log"
    args = ["--port", "0", "--data-dir", str(data_dir), "--org", ORG, "--trust-key", f"{key.public_path}:{key.kid}",
            "--log", str(log_path), *extra]
    program = [os.path.join(BIN, "codestore")]  # the installed entry point
    if open_files is not None:
        program = ["sh", "-c", f'ulimit -Sn {open_files} && exec "$0" "$@"', *program]
    proc, url = start(args, program=program)
    return DevServer(url, data_dir, log_path, proc, key)


@pytest.fixture
def dev_server(tmp_path: Path, org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevServer]:
    """A dev server on 127.0.0.1:<random>, trusting the org key; CODESTORE_BASE_URL points at it."""
    server = start_dev_server(tmp_path / "server", org_key)
    monkeypatch.setenv("CODESTORE_BASE_URL", server.url)
    try:
        yield server
    finally:
        server.stop()


def stop_process(proc: subprocess.Popen[str]) -> None:
    from git_credential_codestore.processes import stop

    stop(proc)


@dataclass
class Clock:
    offset_file: Path

    def set_offset(self, seconds: int) -> None:
        """Move the shared clock to real time + seconds, for every process at once."""
        self.offset_file.write_text(f"+{seconds}\n")


@pytest.fixture
def agent(tmp_path: Path, org_key: OrgKey) -> Iterator[Agent]:
    """A running agent holding the org key (tests/test_agent.py starts it)."""
    from tests.test_agent import start_agent

    a = start_agent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def shared_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One fake clock for git, the helpers and every server started after this fixture.

    libfaketime, preloaded into every child process, re-reads its offset from a file on
    each call, so the test can move time forward mid-session for all of them together.
    """
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert libs, "libfaketime is required for this test (tests/run.sh installs it)"
    clock = Clock(tmp_path / "clock")
    clock.set_offset(0)
    monkeypatch.setenv("LD_PRELOAD", str(libs[0]))
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(clock.offset_file))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    return clock


@pytest.fixture
def clocked_server(
    tmp_path: Path, org_key: OrgKey, shared_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[DevServer, Clock]]:
    """A dev server on the shared fake clock; tokens live 60 s and may write."""
    monkeypatch.setenv("CODESTORE_TTL", "60")
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    server = start_dev_server(tmp_path / "clocked-server", org_key)
    monkeypatch.setenv("CODESTORE_BASE_URL", server.url)
    try:
        yield server, shared_clock
    finally:
        server.stop()


def slow_pre_push_hook(repo: Path, seconds: int) -> None:
    """A pre-push hook that takes `seconds` on the shared fake clock (it moves the clock)."""
    hook = repo / ".git" / "hooks" / "pre-push"
    hook.write_text(f'#!/bin/sh\necho "+{seconds}" > "$FAKETIME_TIMESTAMP_FILE"\n')
    hook.chmod(0o755)


def git(*args: str, cwd: Path | str | None = None, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real git; on failure the assertion shows git's output."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        env=env, timeout=300,
    )
    if check:
        assert proc.returncode == 0, f"git {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def commit(work: Path, name: str, text: str | bytes = "x\n", message: str | None = None,
           env: dict[str, str] | None = None) -> str:
    """Write `text` to the file `name` in the work tree `work` and commit that file (the
    message "add NAME" unless given); the new commit's id."""
    if isinstance(text, bytes):
        (work / name).write_bytes(text)
    else:
        (work / name).write_text(text)
    git("add", name, cwd=work, env=env)
    git("commit", "-qm", message or f"add {name}", cwd=work, env=env)
    return git("rev-parse", "HEAD", cwd=work, env=env).stdout.strip()


def new_repo(work: Path, name: str, text: str, message: str, env: dict[str, str] | None = None) -> None:
    """A new repository at `work` whose one commit adds the file `name` holding `text`."""
    git("init", "-q", str(work), env=env)
    commit(work, name, text, message, env)


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run an installed entry point (`codestore ...`) as a real subprocess."""
    return subprocess.run(
        [os.path.join(BIN, args[0]), *args[1:]],
        input=input, capture_output=True, text=True, env=env, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# Real PostgreSQL (one server per session) and SoftHSM2 tokens for the agent's fleet tests
# (tests/realparts.py, shared with bench/fleet.py); a test CA and OIDC issuers (tests/oidc_issuer.py).
from tests import realparts  # noqa: E402
from tests.oidc_issuer import CertAuthority, Issuer, make_ca, start_issuer  # noqa: E402
from tests.realparts import Postgres, SoftHsm  # noqa: E402

# The sandbox image (install.sh --system, ~15 s) is session-scoped: defined here, once for the
# session; a test module importing the fixture itself would get (and build) its own copy.
from tests.sandboxes import image, remove_users, sandbox_base, sandbox_users, world_readable_tmp  # noqa: E402, F401


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with Postgres() as pg:
        yield pg


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for the test (realparts.refused_port)."""
    with realparts.refused_port() as port:
        yield port


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres.create_database()


@pytest.fixture
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    return SoftHsm(str(tmp_path_factory.mktemp("softhsm")))


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """The session's test CA: it signs every issuer's certificate; agents trust it via agent_env()."""
    return make_ca(tmp_path_factory.mktemp("oidc-ca"))


@pytest.fixture
def issuer(ca: CertAuthority) -> Iterator[Issuer]:
    """A fresh OIDC issuer on loopback (its own keys, its own request log)."""
    with start_issuer(ca) as i:
        yield i
