"""Run one sandbox task on Modal with a codestore grant.

    codestore grant create --repo team/app --scopes "git:read git:write" --ephemeral-only \
        --max-ttl 600 --expires-in 2h --sub modal-task-1 --secret-file ~/.codestore/modal.grant
    CODESTORE_AGENT_URL=https://agent.example.com:8765 CODESTORE_GRANT_FILE=~/.codestore/modal.grant \
    CODESTORE_REPO=acme/team/app CODESTORE_BRANCH=sandbox/task-1 python examples/modal/run.py

Run from the codestore checkout. The image is built as root (install.sh installs
system-wide and writes git's system config, with no key and no grant in any layer); the
grant reaches the sandbox only as a Modal Secret, read here at run time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import modal

HERE = Path(__file__).resolve().parent
CODESTORE_SRC = HERE.parent.parent  # the codestore checkout

# Pin the Python version: debian_slim() would follow the local interpreter's.
image = (
    modal.Image.debian_slim(python_version="3.12")
    .apt_install("git", "ca-certificates")
    .add_local_dir(CODESTORE_SRC, "/opt/codestore-src", copy=True, ignore=[".venv", ".git", "**/__pycache__"])
    .run_commands(
        "/opt/codestore-src/install.sh --setup --org acme",
        "install -m 755 /opt/codestore-src/examples/sandbox/work.sh /usr/local/bin/codestore-work",
        "useradd --create-home sandbox",
    )
)


def main() -> int:
    # Read at run time, on your machine: never when Modal imports this file in a container.
    grant = Path(os.path.expanduser(os.environ["CODESTORE_GRANT_FILE"])).read_text().strip()
    app = modal.App.lookup("codestore-sandbox", create_if_missing=True)
    secret = modal.Secret.from_dict({"CODESTORE_GRANT": grant})
    sb = modal.Sandbox.create(
        app=app,
        image=image,
        secrets=[secret],
        env={
            "CODESTORE_AGENT_URL": os.environ["CODESTORE_AGENT_URL"],
            "CODESTORE_REPO": os.environ["CODESTORE_REPO"],
            "CODESTORE_BRANCH": os.environ["CODESTORE_BRANCH"],
        },
        timeout=3600,
    )
    try:
        # Sandbox.exec does not raise when the command fails: read the exit code.
        proc = sb.exec("runuser", "-u", "sandbox", "--", "sh", "-c", "cd && HOME=/home/sandbox codestore-work", timeout=1800)
        code = proc.wait()
        sys.stdout.write(proc.stdout.read())
        sys.stderr.write(proc.stderr.read())
        if code != 0:
            raise SystemExit(f"the sandbox task failed with exit code {code}")
        return 0
    finally:
        sb.terminate()


if __name__ == "__main__":
    raise SystemExit(main())
