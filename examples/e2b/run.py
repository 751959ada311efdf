"""Run one sandbox task on E2B (SDK 2.x) with a codestore grant.

    codestore grant create --repo team/app --scopes "git:read git:write" --ephemeral-only \
        --max-ttl 600 --expires-in 2h --sub e2b-task-1 --secret-file ~/.codestore/e2b.grant
    CODESTORE_AGENT_URL=https://agent.example.com:8765 CODESTORE_GRANT_FILE=~/.codestore/e2b.grant \
    CODESTORE_REPO=acme/team/app CODESTORE_BRANCH=sandbox/task-1 python examples/e2b/run.py

The template (examples/e2b/e2b.Dockerfile) is built as root and runs as `user`. The
grant is written into the sandbox as a 0600 file with the filesystem API: it never
enters an image layer, argv, or the sandbox's process environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from e2b import Sandbox

GRANT_PATH = "/home/user/.config/codestore/grant"


def main() -> int:
    grant = Path(os.path.expanduser(os.environ["CODESTORE_GRANT_FILE"])).read_text().strip()
    sbx = Sandbox.create(template=os.environ.get("E2B_TEMPLATE", "codestore-sandbox"), timeout=3600)
    try:
        # commands.run raises CommandExitException on a non-zero exit; its default timeout
        # is 60 s, too short for a clone and a task: 0 means none (the sandbox's own
        # timeout still bounds it).
        sbx.commands.run("umask 077 && mkdir -p /home/user/.config/codestore", user="user")
        sbx.files.write(GRANT_PATH, grant, user="user")
        sbx.commands.run(f"chmod 600 {GRANT_PATH}", user="user")
        result = sbx.commands.run(
            "codestore-work",
            envs={
                "CODESTORE_AGENT_URL": os.environ["CODESTORE_AGENT_URL"],
                "CODESTORE_GRANT_FILE": GRANT_PATH,
                "CODESTORE_REPO": os.environ["CODESTORE_REPO"],
                "CODESTORE_BRANCH": os.environ["CODESTORE_BRANCH"],
            },
            user="user",
            cwd="/home/user",
            timeout=0,
        )
        print(result.stdout, end="")
        return 0
    finally:
        sbx.kill()


if __name__ == "__main__":
    raise SystemExit(main())
