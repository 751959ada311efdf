"""`codestore demo`: the whole flow, offline, in a throwaway environment.

A fresh key, the embedded dev server, a repository, `git clone`/commit/`push`/`fetch`
through the `codestore://` remote helper (read-only tokens for fetches, write only for
the push) and a plain-URL clone through the credential helper, then proof that no token
was left behind. Everything lives in a temporary directory with its own git config and key
file: the user's ~/.gitconfig and keychain are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from .errors import CodestoreError

JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")
ORG = "demo"
REPO = "team/app"


def find_secrets(root: str, needles: list[bytes]) -> list[str]:
    """Files under root holding a JWT-shaped string or one of the needles."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if JWT_SHAPE.search(data) or any(n and n in data for n in needles):
                hits.append(path)
    return hits


def run(say: Callable[[str], None], keep: bool = False) -> int:
    from . import api, keys, tokens
    from .git import run as git_run
    from .setup import setup as git_setup

    work = tempfile.mkdtemp(prefix="codestore-demo-")
    server: subprocess.Popen[str] | None = None
    try:
        home = os.path.join(work, "home")
        os.makedirs(home)
        key_path = os.path.join(work, "org-key.pem")
        os.environ.update(
            {
                "HOME": home,
                "XDG_CONFIG_HOME": os.path.join(home, ".config"),
                "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
                "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
                "GIT_CONFIG_GLOBAL": os.path.join(home, ".gitconfig"),
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_TERMINAL_PROMPT": "0",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
                "CODESTORE_CONFIG": os.path.join(home, "codestore.toml"),
                "CODESTORE_ORG": ORG,
                "CODESTORE_PRIVATE_KEY_FILE": key_path,
                "CODESTORE_KID": "demo-key-1",
                # git finds git-credential-codestore and git-remote-codestore here.
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            }
        )
        for k in [k for k in os.environ if k.startswith("CODESTORE_") and k not in (
            "CODESTORE_CONFIG", "CODESTORE_ORG", "CODESTORE_PRIVATE_KEY_FILE", "CODESTORE_KID")]:
            del os.environ[k]
        os.environ.setdefault("GIT_AUTHOR_NAME", "codestore demo")
        os.environ.setdefault("GIT_AUTHOR_EMAIL", "demo@example.com")
        os.environ.setdefault("GIT_COMMITTER_NAME", "codestore demo")
        os.environ.setdefault("GIT_COMMITTER_EMAIL", "demo@example.com")

        say(f"1. A fresh EC P-256 org key (kept in {key_path}, mode 0600)")
        key = keys.generate("ec")
        pem = keys.private_pem(key)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem.reveal())

        say("2. The embedded dev server: real git http-backend behind Code Storage's JWT rules")
        data_dir = os.path.join(work, "server")
        server = subprocess.Popen(
            [sys.executable, "-m", "git_credential_codestore.cli", "dev-server", "--port", "0",
             "--data-dir", data_dir, "--org", ORG],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        if "serving " not in line:
            err = server.stderr.read() if server.stderr else ""
            raise CodestoreError(f"the dev server did not start: {(err or line).strip()[-300:]}")
        base = line.split("serving ", 1)[1].split()[0]
        os.environ["CODESTORE_BASE_URL"] = base
        say(f"   serving {base}")
        with open(os.environ["CODESTORE_CONFIG"], "w") as f:
            # Least privilege: read-only everywhere, write only where configured.
            f.write(f'[repos."{REPO}"]\nscopes = "git:read git:write"\n')

        say(f"3. Create {REPO} through the REST API (a repo:write token for that id only)")
        token = tokens.mint(key, org=ORG, repo=REPO, scopes=["repo:write"], ttl=60, sub="codestore-demo", kid="demo-key-1")
        api.create_repo(base, token, "main")

        say("4. codestore setup: our helper for this host, with the helper chain reset")
        from . import config

        git_setup(config.load())

        def git(*args: str, cwd: str | None = None) -> str:
            return git_run(list(args), cwd=cwd).stdout

        remote = f"codestore://{ORG}/{REPO}"
        clone = os.path.join(work, "app")
        say(f"5. git clone {remote}   (the remote helper mints a git:read token for the fetch)")
        git("clone", "-q", remote, clone)
        with open(os.path.join(clone, "README.md"), "w") as f:
            f.write("hello from codestore\n")
        git("add", "README.md", cwd=clone)
        git("commit", "-qm", "First commit", cwd=clone)
        say("6. git push origin HEAD:main   (only the push gets git:write)")
        git("push", "-q", "origin", "HEAD:main", cwd=clone)
        git("fetch", "-q", cwd=clone)
        url = f"{base}/{REPO}.git"
        other = os.path.join(work, "app2")
        say(f"7. git clone {url}   (plain URL, no token in it: the credential helper answers)")
        git("clone", "-q", url, other)
        say("   " + git("log", "--oneline", "-1", cwd=other).strip())
        say("   (git never tells a credential helper fetch from push, so it mints what config allows;")
        say("    codestore:// URLs can tell, and do)")

        say("8. What the server saw (from its request log: scopes per request, never the token)")
        import json

        with open(os.path.join(data_dir, "requests.log")) as f:
            for entry in map(json.loads, f):
                scopes = " ".join(entry.get("scopes") or []) or "-"
                say(f"   {entry.get('status')} {entry.get('method'):4} {entry.get('service') or entry.get('path')}  scopes: {scopes}")

        say("9. Proof: no token or key material in the clones, the git config or the server's files")
        needles = [pem.reveal().encode(), b"BEGIN PRIVATE KEY"]
        hits = [h for h in find_secrets(work, needles) if h != key_path]
        say(f"   git remote -v: {git('remote', '-v', cwd=clone).splitlines()[0]}")
        if hits:
            raise CodestoreError(f"token or key material found in: {', '.join(hits)}")
        say("   none found in .git/config, the clones, ~/.gitconfig or the server's data")
        say("Done: plain git, short-lived tokens minted per operation, nothing secret left behind.")
        return 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        if keep:
            say(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
