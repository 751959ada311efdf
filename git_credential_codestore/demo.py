"""`codestore demo`: the whole flow, offline, in a throwaway environment.

A fresh key, the embedded dev server, a repository, `git clone`/commit/`push`/`fetch`
through the `codestore://` remote helper (read-only tokens for fetches, write only for
the push) and a plain-URL clone through the credential helper, then proof that no token
was left behind. Everything lives in a temporary directory with its own git config and key
file, in an environment handed to every step (this process's own is never rewritten): the
user's ~/.gitconfig and keychain are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from . import jsontext
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


def demo_environment(work: str, base: dict[str, str]) -> dict[str, str]:
    """The demo's own environment: a throwaway HOME, git config, key file and codestore config."""
    home = os.path.join(work, "home")
    env = {k: v for k, v in base.items() if not k.startswith(("CODESTORE_", "GIT_"))}
    env.update(
        {
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
            "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            "GIT_CONFIG_GLOBAL": os.path.join(home, ".gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
            "CODESTORE_CONFIG": os.path.join(home, "codestore.toml"),
            "CODESTORE_ORG": ORG,
            "CODESTORE_PRIVATE_KEY_FILE": os.path.join(work, "org-key.pem"),
            "CODESTORE_KID": "demo-key-1",
            # git finds git-credential-codestore and git-remote-codestore here.
            "PATH": os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", ""),
            "GIT_AUTHOR_NAME": base.get("GIT_AUTHOR_NAME", "codestore demo"),
            "GIT_AUTHOR_EMAIL": base.get("GIT_AUTHOR_EMAIL", "demo@example.com"),
            "GIT_COMMITTER_NAME": base.get("GIT_COMMITTER_NAME", "codestore demo"),
            "GIT_COMMITTER_EMAIL": base.get("GIT_COMMITTER_EMAIL", "demo@example.com"),
        }
    )
    return env


def run(say: Callable[[str], None], keep: bool = False) -> int:
    from . import api, config, keys, tokens
    from .files import write_atomic
    from .git import run as git_run
    from .processes import start_dev_server, stop
    from .setup import setup as git_setup

    work = tempfile.mkdtemp(prefix="codestore-demo-")
    server: subprocess.Popen[str] | None = None
    try:
        # This process's environment is left alone: every git and codestore step gets this one.
        env = demo_environment(work, dict(os.environ))
        os.makedirs(env["HOME"])
        key_path = env["CODESTORE_PRIVATE_KEY_FILE"]

        say(f"1. A fresh EC P-256 org key (kept in {key_path}, mode 0600)")
        key = keys.generate("ec")
        pem = keys.private_pem(key)
        write_atomic(key_path, pem.reveal(), 0o600)

        say("2. The embedded dev server: real git http-backend behind Code Storage's JWT rules")
        data_dir = os.path.join(work, "server")
        server, base = start_dev_server(["--port", "0", "--data-dir", data_dir, "--org", ORG], env=env)
        env["CODESTORE_BASE_URL"] = base
        say(f"   serving {base}")
        with open(env["CODESTORE_CONFIG"], "w") as f:
            # Least privilege: read-only everywhere, write only where configured.
            f.write(f'[repos."{REPO}"]\nscopes = "git:read git:write"\n')

        say(f"3. Create {REPO} through the REST API (a repo:write token for that id only)")
        token = tokens.mint(key, org=ORG, repo=REPO, scopes=["repo:write"], ttl=60, sub="codestore-demo", kid="demo-key-1")
        api.create_repo(base, token, "main")

        say("4. codestore setup: our helper for this host, with the helper chain reset")
        git_setup(config.load(env), env)

        def git(*args: str, cwd: str | None = None) -> str:
            return git_run(list(args), cwd=cwd, env=env).stdout

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

        with open(os.path.join(data_dir, "requests.log")) as f:
            for entry in map(jsontext.loads, f):
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
            stop(server)
        if keep:
            say(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
