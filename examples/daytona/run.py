"""Run one sandbox task on Daytona with a codestore grant.

    codestore grant create --repo team/app --scopes "git:read git:write" --ephemeral-only \
        --max-ttl 600 --expires-in 2h --sub daytona-task-1 --secret-file ~/.codestore/daytona.grant
    CODESTORE_AGENT_URL=https://agent.example.com:8765 CODESTORE_GRANT_FILE=~/.codestore/daytona.grant \
    CODESTORE_REPO=acme/team/app CODESTORE_BRANCH=sandbox/task-1 python examples/daytona/run.py

Run from the codestore checkout. The image is built as root (install.sh installs
system-wide and writes git's system config) and the sandbox runs as `daytona`. The
grant is uploaded as a 0600 file: never an image layer, argv or environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from daytona import CreateSandboxFromImageParams, Daytona, Image, Sandbox

HERE = Path(__file__).resolve().parent
CODESTORE_SRC = HERE.parent.parent
GRANT_PATH = "/home/daytona/.config/codestore/grant"

image = (
    Image.debian_slim("3.12")
    .run_commands("apt-get update && apt-get install -y --no-install-recommends git ca-certificates")
    .add_local_dir(CODESTORE_SRC, "/opt/codestore-src")
    .run_commands(
        "/opt/codestore-src/install.sh --setup --org acme",
        "install -m 755 /opt/codestore-src/examples/sandbox/work.sh /usr/local/bin/codestore-work",
    )
)


def run(sandbox: Sandbox, command: str, cwd: str | None = None, timeout: int | None = None) -> str:
    """process.exec does not raise when the command fails: check its exit code."""
    response = sandbox.process.exec(command, cwd=cwd, timeout=timeout)
    if response.exit_code != 0:
        raise SystemExit(f"{command.split()[0]} failed in the sandbox (exit {response.exit_code}): {response.result}")
    return response.result


def main() -> int:
    grant = Path(os.path.expanduser(os.environ["CODESTORE_GRANT_FILE"])).read_text().strip()
    daytona = Daytona()
    sandbox = daytona.create(
        CreateSandboxFromImageParams(
            image=image,
            os_user="daytona",
            env_vars={
                "CODESTORE_AGENT_URL": os.environ["CODESTORE_AGENT_URL"],
                "CODESTORE_GRANT_FILE": GRANT_PATH,
                "CODESTORE_REPO": os.environ["CODESTORE_REPO"],
                "CODESTORE_BRANCH": os.environ["CODESTORE_BRANCH"],
            },
        ),
        timeout=600,
    )
    try:
        run(sandbox, "mkdir -p /home/daytona/.config/codestore")
        sandbox.fs.upload_file(grant.encode(), GRANT_PATH)
        sandbox.fs.set_file_permissions(GRANT_PATH, mode="600")
        print(run(sandbox, "codestore-work", cwd="/home/daytona", timeout=1800), end="")
        return 0
    finally:
        daytona.delete(sandbox)


if __name__ == "__main__":
    raise SystemExit(main())
