"""Benchmark: the helpers' fast path on a machine configured as the README says, one run.

The machine: `codestore key generate` (the key in its default store: the OS keychain,
else the 0600 file), `codestore config set org/kid/base_url` (config.toml), `codestore
setup` (git's credential config), an agent at the default socket; a dev server on
127.0.0.1 trusting the key. Everything runs from the venv this script runs in (bench/run
gives it install.sh's, with its lean launchers). Cases are interleaved, so the ratios
hold on a busy machine even when the absolute numbers do not. It prints the six
numbers the README quotes:

1. `git credential fill` via the agent, config.toml present      / git credential-store
2. `git credential fill` signing with the key from its default store / git credential-store
   (and, under both, the floor: `git credential fill` through a helper that is nothing but
   the interpreter, started by git the way ours is; what we add is measured against it)
3. `git ls-remote codestore://...` minus `git ls-remote http://t:JWT@...` (same server)
4. one chunked response from the dev server (a Nagle stall shows as ~40 ms;
   bench/devserver_latency.py measures the dev server's latency in detail)
5. `git credential fill` in a sandbox as the README sets one up (its own HOME, no key, no
   config.toml: the org and server, the agent's socket and a grant in its environment)
                                                                  / git credential-store
6. `git credential fill` for another host that lists our helper before credential-store,
   minus credential-store alone: what ours costs git when it has to stay silent

Run: <venv>/bin/python bench/fast_path.py [--runs 30]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from base64 import b64encode

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "team/app"
ORG = "acme"


def environment(tmp: str) -> dict[str, str]:
    home = os.path.join(tmp, "home")
    run_dir = os.path.join(tmp, "run")
    os.makedirs(home)
    os.makedirs(run_dir, mode=0o700)
    store_file = os.path.join(tmp, "store")
    with open(store_file, "w") as f:
        f.write("https://t:stored-password@store.example\nhttps://t:other-password@other.example\n")
    gitconfig = os.path.join(home, ".gitconfig")
    # The floor: a helper that is only the interpreter, started by git as ours is (by
    # name, through the launcher's `python -IS`), answering at once.
    floor_bin = os.path.join(tmp, "floor-bin")
    os.makedirs(floor_bin)
    floor = os.path.join(floor_bin, "git-credential-floor")
    with open(floor, "w") as f:
        f.write(f'#!{sys.executable} -IS\nimport sys\nsys.stdout.write("username=t\\npassword=floor\\n")\n')
    os.chmod(floor, 0o755)
    with open(gitconfig, "w") as f:
        f.write(f'[credential "https://store.example"]\n\thelper = store --file {store_file}\n'
                '[credential "https://floor.example"]\n\thelper = floor\n'
                # Another host, for which git asks ours first: it must say nothing, at once.
                f'[credential "https://other.example"]\n\thelper = codestore\n\thelper = store --file {store_file}\n')
    from benchenv import hermetic_env

    return hermetic_env(home, gitconfig, path=(BIN, floor_bin), XDG_RUNTIME_DIR=run_dir)


def sandbox_environment(tmp: str, base: str, socket: str, grant: str) -> dict[str, str]:
    """A sandbox as the README sets one up: its own HOME with no key and no config.toml; the
    org and server (the dev server, where a real sandbox has acme.code.storage's default),
    the agent's socket and a grant in its environment; git configured by `codestore setup`."""
    from benchenv import hermetic_env

    home = os.path.join(tmp, "sandbox-home")
    run_dir = os.path.join(tmp, "sandbox-run")
    os.makedirs(home)
    os.makedirs(run_dir, mode=0o700)
    env = hermetic_env(home, os.path.join(home, ".gitconfig"), path=(BIN,), XDG_RUNTIME_DIR=run_dir,
                       CODESTORE_ORG=ORG, CODESTORE_BASE_URL=base, CODESTORE_AGENT_SOCK=socket,
                       CODESTORE_GRANT=grant)
    codestore(env, "setup")
    return env


def codestore(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([os.path.join(BIN, "codestore"), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"bench: codestore {' '.join(args[:2])} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def timed(args: list[str], env: dict[str, str], stdin: str = "", expect: str = "") -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or expect not in proc.stdout:
        raise SystemExit(f"bench: {' '.join(args[:3])} failed: {proc.stderr.strip()[-300:]}")
    return elapsed


def signed_for(env: dict[str, str], request: str, sub: str) -> None:
    """Fail unless `git credential fill` gets a token stamped with `sub` (a grant's)."""
    from git_credential_codestore.lines import parse_lines
    from git_credential_codestore.secrets import Token
    from git_credential_codestore.tokens import unverified_parts

    proc = subprocess.run(["git", "credential", "fill"], input=request, capture_output=True, text=True, env=env)
    password = dict(parse_lines(proc.stdout.encode(), what="git credential fill's answer")).get("password", "")
    if not password.startswith("eyJ") or unverified_parts(Token(password, 0))[1].get("sub") != sub:
        raise SystemExit(f"bench: git credential fill did not get a token for {sub}: {proc.stderr.strip()[-300:]}")


def chunked_response(base: str, token: str) -> float:
    """One smart-HTTP ref advertisement (a chunked response), on a fresh connection."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    auth = b64encode(f"t:{token}".encode()).decode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", f"/{REPO}.git/info/refs?service=git-upload-pack",
                 headers={"Authorization": f"Basic {auth}", "Git-Protocol": "version=2"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    elapsed = time.perf_counter() - start
    if resp.status != 200:
        raise SystemExit(f"bench: the dev server answered {resp.status} to info/refs")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    opts = parser.parse_args()
    sys.path.insert(0, ROOT)
    from git_credential_codestore import processes

    with tempfile.TemporaryDirectory(prefix="codestore-bench-") as tmp:
        env = environment(tmp)
        # As the README tells a user: the org (install.sh --org), a key in its default store,
        # the kid and (here) the server's URL in config.toml, then `codestore setup`.
        codestore(env, "config", "set", "org", ORG)
        codestore(env, "key", "generate")
        pub = os.path.join(tmp, "org.pub.pem")
        with open(pub, "w") as f:
            f.write(codestore(env, "key", "public"))
        server, base = processes.start_dev_server(
            ["--port", "0", "--data-dir", os.path.join(tmp, "server"), "--org", ORG, "--trust-key", f"{pub}:k1"],
            env=env, program=[os.path.join(BIN, "codestore")],
        )
        agent = None
        try:
            for key, value in (("kid", "k1"), ("base_url", base), ("scopes", "git:read git:write")):
                codestore(env, "config", "set", key, value)
            codestore(env, "setup")
            codestore(env, "repo", "create", REPO)
            work = os.path.join(tmp, "seed")
            subprocess.run(["git", "init", "-q", work], env=env, check=True)
            subprocess.run(["git", "-C", work, "commit", "-q", "--allow-empty", "-m", "seed"], env=env, check=True)
            subprocess.run(["git", "-C", work, "push", "-q", f"codestore://{ORG}/{REPO}", "HEAD:main"], env=env,
                           check=True)
            token = codestore(env, "token", REPO, "--ttl", "3600").strip().splitlines()[-1]
            agent = subprocess.Popen([os.path.join(BIN, "codestore"), "agent", "serve"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            assert agent.stdout is not None
            serving = agent.stdout.readline()
            if not serving.startswith("serving unix:") or not agent.stdout.readline().startswith("ready"):
                raise SystemExit("bench: the agent did not start")
            grant = codestore(env, "grant", "create", "--repo", REPO, "--sub", "bench-sandbox", "--secret-only").strip()
            sandbox = sandbox_environment(tmp, base, serving.split("unix:", 1)[1].strip(), grant)
            no_agent = dict(env, CODESTORE_AGENT="off")
            ours = f"url={base}/{REPO}.git\n\n"
            host = base.split("://", 1)[1]
            fill = ["git", "credential", "fill"]
            cases = {
                "store": lambda: timed(fill, env, "url=https://store.example/r.git\n\n", "password="),
                "another host, ours first": lambda: timed(fill, env, "url=https://other.example/r.git\n\n",
                                                          "password=other-password"),
                "bare python helper": lambda: timed(fill, env, "url=https://floor.example/r.git\n\n", "password=floor"),
                "agent": lambda: timed(fill, env, ours, "password=eyJ"),
                "agent, sandbox's grant": lambda: timed(fill, sandbox, ours, "password=eyJ"),
                "local-key": lambda: timed(fill, no_agent, ours, "password=eyJ"),
                "ls-remote codestore://": lambda: timed(["git", "ls-remote", f"codestore://{ORG}/{REPO}"], env,
                                                        expect="refs/heads/main"),
                "ls-remote token URL": lambda: timed(["git", "ls-remote", f"http://t:{token}@{host}/{REPO}.git"],
                                                     env, expect="refs/heads/main"),
                "chunked response": lambda: chunked_response(base, token),
                "python -IS -c pass": lambda: timed([sys.executable, "-IS", "-c", "pass"], env),
            }
            for case in cases.values():
                case()  # warm the page cache, the config cache and the server
            signed_for(sandbox, ours, "bench-sandbox")  # the sandbox's row is the grant's path
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(opts.runs):
                for name, case in cases.items():
                    times[name].append(case())
            med = {name: statistics.median(v) * 1000 for name, v in times.items()}
            store = med["store"]
            print(f"helpers' fast path, configured with config.toml and the key in its default store; "
                  f"median of {opts.runs} interleaved runs:")
            for name, ms in med.items():
                print(f"   {name:<24} {ms:7.1f} ms   {ms / store:5.2f}x store")
            print("the numbers (targets in parentheses):")
            print(f"   1. credential fill via the agent:       {med['agent'] / store:5.2f}x credential-store  (<= 3.5x)")
            print(f"   2. credential fill, local key:          {med['local-key'] / store:5.2f}x credential-store  (<= 10x)")
            floor = med["bare python helper"]
            print(f"   (the floor, a helper that is only `python -IS` started by git: {floor / store:5.2f}x credential-store;\n"
                  f"    ours above it: via the agent {med['agent'] - floor:+5.1f} ms, with the local key {med['local-key'] - floor:+5.1f} ms)")
            extra = med["ls-remote codestore://"] - med["ls-remote token URL"]
            print(f"   3. ls-remote codestore:// vs token URL: {extra:+5.1f} ms per operation  (<= +15 ms)")
            print(f"   4. one chunked response (dev server):   {med['chunked response']:5.1f} ms  (a Nagle stall is ~40 ms)")
            grant_x = med["agent, sandbox's grant"] / store
            print(f"   5. credential fill in a sandbox, grant: {grant_x:5.2f}x credential-store  (none)")
            silent = med["another host, ours first"] - store
            print(f"   6. another host, ours asked first:      {silent:+5.1f} ms over credential-store alone  (none)")
        finally:
            if agent is not None:
                processes.stop(agent)
            processes.stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
