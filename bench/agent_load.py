"""Benchmark: the agent, as helpers and sandboxes see it. Hermetic temp dirs, one run.

1. `git credential fill` medians, interleaved in the same run:
       store         git-credential-store answering from a file (the baseline)
       agent-grant   our helper with no key, a grant, the agent's socket
       agent-owner   our helper with the key configured and an agent at the default socket
       local-key     our helper signing with the key itself (no agent)
       foreign       another host: our helper stays silent, then git-credential-store answers
2. Load: C concurrent clients (threads in this process, one connection per token, like
   helpers), N tokens each, against one agent: tokens/s and p50/p99 latency, next to the
   raw signing rate of the same key measured in this process.

Run: .venv/bin/python bench/agent_load.py [--runs 30] [--clients 64] [--per-client 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchenv import hermetic_env, write_key  # noqa: E402

from git_credential_codestore import config, keys, tokens  # noqa: E402
from git_credential_codestore.agent.client import Endpoint, call  # noqa: E402
from git_credential_codestore.source import TokenRequest, get_token  # noqa: E402


def environment(tmp: str) -> dict[str, str]:
    key_path = os.path.join(tmp, "org.pem")
    write_key(key_path)
    run = os.path.join(tmp, "run")
    os.makedirs(run, mode=0o700)
    store_file = os.path.join(tmp, "store")
    with open(store_file, "w") as f:
        f.write("https://t:stored-password@store.example\nhttps://u:p@other.example\n")
    gitconfig = os.path.join(tmp, "gitconfig")
    with open(gitconfig, "w") as f:
        f.write(
            f'[credential "https://store.example"]\n\thelper = store --file {store_file}\n'
            '[credential "https://acme.code.storage"]\n\thelper = \n\thelper = codestore\n\tuseHttpPath = true\n'
            f'[credential "https://other.example"]\n\thelper = codestore\n\thelper = store --file {store_file}\n'
        )
    return hermetic_env(tmp, gitconfig, path=(BIN,), XDG_RUNTIME_DIR=run,
                        CODESTORE_ORG="acme", CODESTORE_PRIVATE_KEY_FILE=key_path, CODESTORE_KID="bench")


def start_agent(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([os.path.join(BIN, "codestore"), "agent", "serve"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    ready = proc.stdout.readline()
    if not first.startswith("serving unix:") or not ready.startswith("ready"):
        proc.kill()
        raise SystemExit(f"bench: the agent did not start: {first!r}")
    return proc, first.split("unix:", 1)[1].strip()


def fill(env: dict[str, str], url: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["git", "credential", "fill"], input=f"url={url}\n\n", capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "password=" not in proc.stdout:
        raise SystemExit(f"bench: git credential fill failed: {proc.stderr.strip()}")
    return elapsed


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def signing_rate(env: dict[str, str], seconds: float = 1.0) -> float:
    key, _ = keys.load_private_key(config.load(env), env)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens.mint(key, org="acme", repo="team/app", scopes=["git:read"], ttl=300, sub="bench", kid="bench")
        n += 1
    return n / (time.perf_counter() - start)


def load(env: dict[str, str], clients: int, per_client: int) -> tuple[float, list[float], int]:
    cfg = config.load(env)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        mine = []
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                get_token(TokenRequest(f"team/r{i}", ("git:read",), purpose="bench"), cfg, env)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}")
    return len(latencies) / wall, latencies, len(errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = environment(tmp)
        agent, sock = start_agent(env)
        try:
            status, g = call(Endpoint("unix", sock), "POST", "/v1/grants", {"repos": ["team/*"], "scopes": ["git:read"]}, env=env)
            assert status == 201, g
            grant_env = {k: v for k, v in env.items() if k != "CODESTORE_PRIVATE_KEY_FILE"}
            grant_env.update(CODESTORE_AGENT_SOCK=sock, CODESTORE_GRANT=str(g["grant"]))
            cases = {
                "store": (env, "https://store.example/repo.git"),
                "agent-grant": (grant_env, "https://acme.code.storage/team/app.git"),
                "agent-owner": (env, "https://acme.code.storage/team/app.git"),
                "local-key": (dict(env, CODESTORE_AGENT="off"), "https://acme.code.storage/team/app.git"),
                # Another host: our helper stays silent, then git-credential-store answers.
                "foreign": (env, "https://other.example/repo.git"),
            }
            for e, url in cases.values():
                fill(e, url)  # warm caches
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.runs):
                for name, (e, url) in cases.items():
                    times[name].append(fill(e, url))
            base = statistics.median(times["store"])
            print(f"1. git credential fill, median of {args.runs} interleaved runs each:")
            for name, values in times.items():
                med = statistics.median(values)
                print(f"   {name:<12} {med * 1000:7.1f} ms   {med / base:5.2f}x store")

            raw = signing_rate(env)
            rate, lat, errors = load(grant_env, args.clients, args.per_client)
            print(f"2. {args.clients} concurrent clients x {args.per_client} tokens, each on a new connection, with a grant:")
            print(f"   {rate:7.0f} tokens/s   p50 {pct(lat, 50) * 1000:6.1f} ms   p99 {pct(lat, 99) * 1000:6.1f} ms   "
                  f"errors {errors}")
            print(f"   raw ES256 signing in one thread of this process: {raw:7.0f} tokens/s "
                  f"(agent reaches {rate / raw:.0%} of it)")
            call(Endpoint("unix", sock), "POST", "/v1/shutdown", env=env)
            agent.wait(timeout=10)
        finally:
            if agent.poll() is None:
                agent.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
