"""Benchmark: the dev server's per-request latency as git sees it. Hermetic temp dirs, one run.

Medians of `git ls-remote` (one GET info/refs with a chunked response, then EOF) and of a
small `git fetch` (info/refs + one POST upload-pack) against `codestore dev-server`, the
token in git's environment. A response that stalls on Nagle/delayed-ACK shows up here as
~40 ms per exchange that curl on the same host does not see.

Run: .venv/bin/python bench/devserver_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchenv import hermetic_env, write_key  # noqa: E402

from git_credential_codestore import tokens  # noqa: E402
from git_credential_codestore.processes import start_dev_server, stop  # noqa: E402

ORG = "bench"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key_path = os.path.join(tmp, "org.pem")
        key = write_key(key_path)
        env = hermetic_env(tmp, os.path.join(tmp, "gitconfig"), path=(BIN,))
        open(env["GIT_CONFIG_GLOBAL"], "w").close()
        proc, url = start_dev_server(
            ["--port", "0", "--data-dir", os.path.join(tmp, "srv"), "--org", ORG, "--trust-key", key_path],
            env=env, program=[os.path.join(BIN, "codestore")],
        )
        try:
            def tok(scopes: list[str], repo: str = "b/app") -> str:
                return tokens.mint(key, org=ORG, repo=repo, scopes=scopes, ttl=600, sub="bench").reveal()

            req = urllib.request.Request(url + "/api/v1/repos", method="POST", data=b"{}",
                                         headers={"Authorization": f"Bearer {tok(['repo:write'])}"})
            urllib.request.urlopen(req, timeout=30).read()
            basic = base64.b64encode(f"t:{tok(['git:write'])}".encode()).decode()
            genv = {**env, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}
            work = os.path.join(tmp, "work")
            subprocess.run(["git", "init", "-q", "-b", "main", work], env=genv, check=True)
            with open(os.path.join(work, "f"), "w") as f:
                f.write("x\n")
            subprocess.run(["git", "-C", work, "add", "f"], env=genv, check=True)
            subprocess.run(["git", "-C", work, "commit", "-qm", "x"], env=genv, check=True)
            remote = f"{url}/b/app.git"
            subprocess.run(["git", "-C", work, "push", "-q", remote, "main"], env=genv, check=True)

            def timed(cmd: list[str]) -> float:
                t = time.perf_counter()
                subprocess.run(cmd, env=genv, check=True, capture_output=True)
                return (time.perf_counter() - t) * 1000

            results: dict[str, list[float]] = {"ls-remote": [], "fetch": []}
            for _ in range(args.runs):
                results["ls-remote"].append(timed(["git", "ls-remote", remote]))
                results["fetch"].append(timed(["git", "-C", work, "fetch", "-q", remote, "main"]))
            out = {k: round(statistics.median(v), 1) for k, v in results.items()}
            print(json.dumps({"median_ms": out, "runs": args.runs}))
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
