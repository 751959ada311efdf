"""Benchmark: `git credential fill` through git-credential-codestore vs git-credential-store.

Both run in the same process, interleaved, in a throwaway HOME and git config, so the
ratio holds on a busy machine even when the absolute numbers do not. Cases:

    store       git-credential-store answering from a file (the baseline: no crypto at all)
    codestore   our helper minting a fresh ES256 token with a local key file
    foreign     another host: our helper stays silent, then git-credential-store answers

Run: .venv/bin/python bench/credential_fill.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def environment(tmp: str) -> dict[str, str]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from git_credential_codestore import keys

    key_path = os.path.join(tmp, "org.pem")
    with open(key_path, "w") as f:
        f.write(keys.private_pem(keys.generate("ec")).reveal())
    gitconfig = os.path.join(tmp, "gitconfig")
    store_file = os.path.join(tmp, "store")
    with open(store_file, "w") as f:
        f.write("https://t:stored-password@store.example\nhttps://u:p@other.example\n")
    with open(gitconfig, "w") as f:
        f.write(
            f'[credential "https://store.example"]\n\thelper = store --file {store_file}\n'
            '[credential "https://acme.code.storage"]\n\thelper = \n\thelper = codestore\n\tuseHttpPath = true\n'
            f'[credential "https://other.example"]\n\thelper = codestore\n\thelper = store --file {store_file}\n'
        )
    return {
        "PATH": BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tmp,
        "GIT_CONFIG_GLOBAL": gitconfig,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "CODESTORE_ORG": "acme",
        "CODESTORE_PRIVATE_KEY_FILE": key_path,
        "CODESTORE_KID": "bench",
    }


CASES = {
    "store": "url=https://store.example/repo.git\n\n",
    "codestore": "url=https://acme.code.storage/team/app.git\n\n",
    "foreign": "url=https://other.example/repo.git\n\n",
}


def fill(env: dict[str, str], text: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["git", "credential", "fill"], input=text, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "password=" not in proc.stdout:
        raise SystemExit(f"bench: git credential fill failed: {proc.stderr.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = environment(tmp)
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for name, text in CASES.items():
            fill(env, text)  # warm the page cache
        for _ in range(args.runs):
            for name, text in CASES.items():
                times[name].append(fill(env, text))
    base = statistics.median(times["store"])
    print(f"git credential fill, median of {args.runs} runs each (interleaved):")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<10} {med * 1000:7.1f} ms   {med / base:5.1f}x store")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
