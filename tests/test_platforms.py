"""macOS and Windows, with the platform faked at its seams.

What is faked: `sys.platform`, `os.uname` (absent on Windows), `_socket.AF_UNIX` (absent
on Windows), and platformdirs' platform class (which it picks once, at import). The
helpers then run their real code paths here, against the real git and dev server.

Not tested here, because it cannot run on this Linux machine: a real Windows or macOS
Python (path separators, `.exe` launchers, Windows' console and pipe behaviour, the
Windows Credential Manager and macOS Keychain backends of keyring, file ACLs where Unix
modes mean nothing), git for Windows' helper lookup, and the agent's Unix socket on macOS
(the agent is not offered on Windows at all).
"""

from __future__ import annotations

import _socket
import io
import os
import sys
from pathlib import Path

import platformdirs
import pytest

from git_credential_codestore import config, credential, keys
from remote_helper import main as remote_helper
from tests.conftest import ORG, DevServer, OrgKey, git

REPO = "team/app"


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No os.uname, no AF_UNIX, platformdirs' Windows rules (folders from %LOCALAPPDATA%)."""
    import platformdirs.windows as pd_windows

    monkeypatch.delattr(os, "uname")
    monkeypatch.delattr(_socket, "AF_UNIX")
    monkeypatch.setattr(platformdirs, "PlatformDirs", pd_windows.Windows)
    # The real resolver asks the Windows shell API (ctypes.windll); its env-var fallback is platformdirs' own.
    monkeypatch.setattr(pd_windows, "_RESOLVE_WIN_FOLDER", pd_windows.get_win_folder_from_env_vars)
    local = tmp_path / "AppData" / "Local"
    monkeypatch.setenv("LOCALAPPDATA", str(local))
    monkeypatch.setenv("APPDATA", str(tmp_path / "AppData" / "Roaming"))
    return local


@pytest.fixture
def win32(windows: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """...and sys.platform itself (not under click: its Windows console code needs msvcrt)."""
    monkeypatch.setattr(sys, "platform", "win32")
    return windows


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch, hermetic: Path) -> Path:
    from platformdirs.macos import MacOS

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platformdirs, "PlatformDirs", MacOS)
    for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(k, raising=False)  # platformdirs honours them on macOS too
    return hermetic / "Library" / "Application Support"


def ask(host: str, path: str) -> list[str]:
    out, err = io.BytesIO(), io.BytesIO()
    credential.run(["get"], io.BytesIO(f"protocol=http\nhost={host}\npath={path}\n\n".encode()), out, err, dict(os.environ))
    assert err.getvalue() == b"", err.getvalue()
    return out.getvalue().decode().splitlines()


def test_the_default_sub_names_the_host_without_os_uname(win32: Path) -> None:
    # The crash this fixes: AttributeError: module 'os' has no attribute 'uname'.
    import socket

    assert config.Config(org=ORG).sub == f"codestore@{socket.gethostname()}"


def test_the_credential_helper_mints_on_windows_with_the_local_key(win32: Path, dev_server: DevServer) -> None:
    reply = ask(dev_server.url.split("://")[1], f"{REPO}.git")
    assert reply[0] == "username=t" and reply[1].startswith("password=eyJ")


def test_the_helpers_skip_the_agent_socket_where_there_are_no_unix_sockets(win32: Path, org_key: OrgKey, tmp_path: Path) -> None:
    from git_credential_codestore.source import LocalKeySource, choose_source

    trace = tmp_path / "trace"
    src = choose_source(config.load(), {**os.environ, "CODESTORE_TRACE": str(trace)})
    assert isinstance(src, LocalKeySource) and "no Unix sockets on this platform" in trace.read_text()


def test_the_remote_helper_clones_over_plain_streams_on_windows(win32: Path, dev_server: DevServer, tmp_path: Path) -> None:
    # In-memory streams: no fds, so no os.splice (there is none on Windows or macOS).
    dev_server.create_repo(REPO)
    out, err = io.BytesIO(), io.BytesIO()
    status = remote_helper.run(["origin", f"codestore://{ORG}/{REPO}"], io.BytesIO(b"capabilities\n\nlist\n\n"), out, err, env=dict(os.environ))
    assert status == 0, err.getvalue()
    assert b"stateless-connect" in out.getvalue()


def test_keys_setup_and_the_cli_work_on_windows_and_say_the_agent_is_posix_only(windows: Path, org_key: OrgKey, monkeypatch: pytest.MonkeyPatch) -> None:
    from git_credential_codestore.cli import main

    monkeypatch.delenv("CODESTORE_PRIVATE_KEY_FILE")
    # config.user_dir takes its Linux rule without platformdirs; Windows is decided by
    # sys.platform, which cannot be faked process-wide under click: fake it for config alone.
    import types

    monkeypatch.setattr(config, "sys", types.SimpleNamespace(platform="win32", version_info=sys.version_info))
    assert main(["key", "generate"]) == 0
    # Where platformdirs puts app data on Windows (keyring's fail backend: the file fallback).
    stored = windows / "codestore" / "codestore" / "keys" / f"{ORG}.pem"
    assert keys.fallback_key_path(ORG) == str(stored) and stored.exists()
    assert keys.load_private_key(config.load())[1] == "the codestore key file"
    assert main(["setup"]) == 0
    assert git("config", "--global", "--get-all", "credential.https://acme.code.storage.helper").stdout.split("\n")[:2] == ["", "codestore"]
    assert main(["agent", "start"]) == 1


def test_the_agent_on_windows_is_one_line_naming_codestore_agent_url(windows: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from git_credential_codestore.cli import main

    assert main(["agent", "serve"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CODESTORE_AGENT_URL" in err and "Unix socket" in err


def test_on_windows_config_lives_under_localappdata(win32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODESTORE_CONFIG", raising=False)
    assert config.config_path() == str(win32 / "codestore" / "codestore" / "config.toml")


def test_on_macos_config_and_keys_live_under_library_application_support(macos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the README says: not ~/.config on a Mac.
    monkeypatch.delenv("CODESTORE_CONFIG", raising=False)
    assert config.config_path() == str(macos / "codestore" / "config.toml")
    assert keys.fallback_key_path(ORG) == str(macos / "codestore" / "keys" / f"{ORG}.pem")
    config.set_value("org", ORG)
    assert config.load().org == ORG and (macos / "codestore" / "config.toml").exists()
