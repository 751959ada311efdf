"""contrib/systemd/codestore-agent.service: its ExecStart runs as a service would run it.

systemd is not running here, so the test does what systemd does with the unit: a clean
environment (no XDG_RUNTIME_DIR, no session, HOME the service user's), the unit's
Environment= lines with %d (the credentials directory) filled in, and the directories
StateDirectory=/RuntimeDirectory=/LogsDirectory= create, exported as
$STATE_DIRECTORY/$RUNTIME_DIRECTORY/$LOGS_DIRECTORY and expanded in ExecStart. The
program is the installed `codestore` (the unit names /usr/local/bin/codestore).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.conftest import BIN, ORG, OrgKey, stop_process
from tests.test_agent import REPO, mint, sandbox_env

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "codestore-agent.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_units_command_line_serves_without_xdg_runtime_dir(org_key: OrgKey, tmp_path: Path) -> None:
    s = unit_settings()
    dirs = {name: tmp_path / name.lower() for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "LOGS_DIRECTORY")}
    for d in dirs.values():
        d.mkdir(mode=0o700)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (name, _, source), = (c.partition(":") for c in s["LoadCredential"])
    assert source.startswith("/etc/") and name == "org-key"
    shutil.copy(org_key.path, creds / name)  # what LoadCredential= does
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "service-home"), "LANG": "C.UTF-8",
           "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring", **{k: str(v) for k, v in dirs.items()}}
    for assignment in s["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%d", str(creds))
    assert "XDG_RUNTIME_DIR" not in env and env["CODESTORE_ORG"] == ORG
    env["CODESTORE_KID"] = org_key.kid  # the kid the test's key is registered under
    (exec_start,) = s["ExecStart"]
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in shlex.split(exec_start)]
    assert argv[0] == "/usr/local/bin/codestore"
    argv[0] = os.path.join(BIN, "codestore")
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"  # any free port here
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        assert any(line.startswith("ready") for line in lines) or proc.poll() is None, (lines, err)
        sock = dirs["RUNTIME_DIRECTORY"] / "agent.sock"
        assert sock.is_socket()
        made = subprocess.run([os.path.join(BIN, "codestore"), "grant", "create", "--socket", str(sock), "--repo", REPO,
                               "--secret-only"], env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        assert mint(sandbox_env(made.stdout.strip(), sock=str(sock))).startswith("eyJ")
        assert (dirs["LOGS_DIRECTORY"] / "audit.log").exists()
        assert any(dirs["STATE_DIRECTORY"].iterdir())
    finally:
        stop_process(proc)
