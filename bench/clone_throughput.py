"""Benchmark: `git clone codestore://...` vs `git clone http://t:JWT@...` of a ~50 MB repository.

The baseline is exactly what the remote helper replaces: the token in the URL, git's own
HTTP transport, no helper in between. Both clone the same repository from the same dev
server on 127.0.0.1, interleaved, in a throwaway HOME and git config, so the ratio holds
on a busy machine even when the absolute numbers do not.

Run: .venv/bin/python bench/clone_throughput.py [--runs N] [--mb SIZE]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "bench/big"


def environment(tmp: str, key_path: str) -> dict[str, str]:
    home = os.path.join(tmp, "home")
    os.makedirs(home)
    gitconfig = os.path.join(home, ".gitconfig")
    with open(gitconfig, "w") as f:
        f.write("[init]\n\tdefaultBranch = main\n[protocol]\n\tversion = 2\n")
    from benchenv import hermetic_env

    return hermetic_env(
        home, gitconfig, path=(BIN,),
        CODESTORE_ORG="acme",
        CODESTORE_PRIVATE_KEY_FILE=key_path,
        CODESTORE_KID="k1",
        CODESTORE_SCOPES="git:read git:write",
        CODESTORE_TTL="3600",
    )


def run(args: list[str], env: dict[str, str], cwd: str | None = None) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def start_server(tmp: str, env: dict[str, str], pub_path: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [os.path.join(BIN, "codestore"), "dev-server", "--port", "0", "--data-dir", os.path.join(tmp, "server"),
         "--org", "acme", "--trust-key", f"{pub_path}:k1", "--log", os.path.join(tmp, "requests.log")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving " not in line:
        proc.kill()
        raise SystemExit(f"dev server did not start: {line!r}")
    return proc, line.split("serving ", 1)[1].split()[0]


def seed(tmp: str, env: dict[str, str], mb: int) -> None:
    """A repository of `mb` MB of random (incompressible) bytes in a few files and commits."""
    run([os.path.join(BIN, "codestore"), "repo", "create", REPO], env)
    work = os.path.join(tmp, "seed")
    run(["git", "init", "-q", work], env)
    files = 10
    for i in range(files):
        with open(os.path.join(work, f"blob{i}.bin"), "wb") as f:
            f.write(os.urandom(mb * 1024 * 1024 // files))
        run(["git", "add", "."], env, work)
        run(["git", "commit", "-qm", f"blob {i}"], env, work)
    run(["git", "push", "-q", f"codestore://acme/{REPO}", "main"], env, work)


def timed_clone(url: str, env: dict[str, str], dest: str) -> tuple[float, float]:
    """Wall time, and CPU time of git and everything it ran (the server's is not counted)."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run(["git", "clone", "-q", "--no-checkout", url, dest], env)
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(dest)
    return elapsed, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="clones of each kind (default 9)")
    parser.add_argument("--mb", type=int, default=50, help="repository size in MB (default 50)")
    opts = parser.parse_args()
    sys.path.insert(0, ROOT)
    from benchenv import write_key

    from git_credential_codestore import keys, tokens

    with tempfile.TemporaryDirectory(prefix="codestore-bench-") as tmp:
        key_path, pub_path = os.path.join(tmp, "org.pem"), os.path.join(tmp, "org.pub.pem")
        key = write_key(key_path)
        with open(pub_path, "w") as f:
            f.write(keys.public_pem(key))
        env = environment(tmp, key_path)
        server, base = start_server(tmp, env, pub_path)
        try:
            env["CODESTORE_BASE_URL"] = base
            seed(tmp, env, opts.mb)
            # The baseline's token: read-only, like the one the helper mints for a clone.
            jwt = tokens.mint(key, org="acme", repo=REPO, scopes=("git:read",), ttl=3600, sub="bench", kid="k1").reveal()
            host = base.split("://", 1)[1]
            urls = {
                "codestore": f"codestore://acme/{REPO}",
                "url-token": f"http://t:{jwt}@{host}/{REPO}.git",
            }
            times: dict[str, list[float]] = {name: [] for name in urls}
            cpu: dict[str, list[float]] = {name: [] for name in urls}
            for url in urls.values():  # warm the page cache and the server
                timed_clone(url, env, os.path.join(tmp, "warm"))
            for i in range(opts.runs):
                order = list(urls) if i % 2 == 0 else list(reversed(urls))
                for name in order:
                    wall, used = timed_clone(urls[name], env, os.path.join(tmp, f"clone-{name}"))
                    times[name].append(wall)
                    cpu[name].append(used)
        finally:
            server.terminate()
            server.wait(timeout=10)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"clone of a {opts.mb} MB repository (random content), {opts.runs} interleaved runs each, medians:")
    for name, t in times.items():
        print(
            f"  {name:<10} wall {med[name] * 1000:6.0f} ms (min {min(t) * 1000:.0f}, max {max(t) * 1000:.0f})"
            f"   client CPU {med_cpu[name] * 1000:6.0f} ms"
        )
    ratio = med["codestore"] / med["url-token"]
    print(f"  ratio codestore / url-token, wall: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    extra = (med_cpu["codestore"] - med_cpu["url-token"]) * 1000
    print(f"  extra client CPU per clone (helper start, token, splice): {extra:+.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
