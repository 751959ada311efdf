"""Root-built images, non-root users: install.sh --system and `codestore setup --system`.

E2B and Daytona (and most Dockerfiles) build the image as root and run it as another
user. A per-user install under /root is unreadable to that user; so as root install.sh
installs system-wide and `setup --system` writes git's system config, with no key and
no network at build time.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ORG, DevServer, git
from tests.sandboxes import (
    Image,
    as_user,
    give,
    make_home,
    sandbox_env,
    sandbox_user,
)
from tests.test_agent import REPO, Agent

ROOT = Path(__file__).resolve().parent.parent


def build_step(image: Image, gitconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command run while building the image: as root, no key, and (where we can cut it) no network."""
    env = {"PATH": f"{image.bin_dir}:/usr/bin:/bin", "HOME": str(gitconfig.parent / "build-home"),
           "GIT_CONFIG_SYSTEM": str(gitconfig), "GIT_CONFIG_GLOBAL": os.devnull,
           "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    offline = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    return subprocess.run([*offline, *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def grant_file_for(user_home: Path, agent: Agent, owner_tmp: Path, user, *args: str) -> Path:
    """`grant create --secret-file` on the owner's side, then the file handed into the sandbox."""
    src = owner_tmp / f"grant-{user_home.name}"
    proc = agent.cli("grant", "create", "--repo", REPO, "--scopes", "git:write", "--ephemeral-only", *args, "--secret-file", str(src))
    assert proc.returncode == 0, proc.stderr
    dst = user_home / ".codestore-grant"
    shutil.copy(src, dst)
    return give(dst, user, 0o600)


def test_as_root_install_sh_installs_for_every_user(image: Image) -> None:
    assert "--system" not in image.install_output  # the flag is ours, not something it prints
    for prog in ("codestore", "git-credential-codestore", "git-remote-codestore"):
        target = (image.bin_dir / prog).resolve()
        assert target.is_relative_to(image.prefix)
        # Threat-free but fatal: an image whose programs its user cannot run.
        assert target.stat().st_mode & stat.S_IXOTH
    for path in image.prefix.rglob("*"):
        if not path.is_symlink():
            assert path.stat().st_mode & stat.S_IROTH, path


def test_setup_system_writes_git_system_config_without_key_or_network(image: Image, sandbox_base: Path) -> None:
    gitconfig = sandbox_base / "gitconfig"
    proc = build_step(image, gitconfig, "codestore", "setup", "--system", "--org", ORG)
    assert proc.returncode == 0, proc.stderr
    helpers = git("config", "--file", str(gitconfig), "--get-all", f"credential.https://{ORG}.code.storage.helper")
    assert helpers.stdout.splitlines() == ["", f"codestore --org {ORG}"]
    again = build_step(image, gitconfig, "codestore", "setup", "--system", "--org", ORG)
    assert again.returncode == 0 and "already set up" in again.stdout
    undone = build_step(image, gitconfig, "codestore", "setup", "--system", "--org", ORG, "--undo")
    assert undone.returncode == 0 and gitconfig.read_text().strip() == ""


def test_setup_system_without_an_org_names_the_flag(image: Image, sandbox_base: Path) -> None:
    proc = build_step(image, sandbox_base / "gitconfig", "codestore", "setup", "--system")
    assert proc.returncode == 1 and proc.stderr.startswith("codestore: ") and "--org" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_non_root_user_of_a_root_built_image_clones_and_pushes_with_a_grant(
    image: Image, sandbox_base: Path, dev_server: DevServer, agent: Agent, tmp_path: Path
) -> None:
    dev_server.create_repo(REPO)
    gitconfig = sandbox_base / "gitconfig"
    built = build_step(image, gitconfig, "codestore", "setup", "--system", "--org", ORG, "--base-url", dev_server.url)
    assert built.returncode == 0, built.stderr
    user = sandbox_user("codestore-sbx-a")
    home = make_home(sandbox_base, user, "home-a")
    grant = grant_file_for(home, agent, tmp_path, user, "--sub", "image-user")
    # Plain https URLs: the helper line in git's system config is all the user has.
    env = sandbox_env(home, image, GIT_CONFIG_SYSTEM=str(gitconfig), CODESTORE_AGENT_URL=agent.url,
                      CODESTORE_GRANT_FILE=str(grant), GIT_AUTHOR_NAME="u", GIT_AUTHOR_EMAIL="u@x",
                      GIT_COMMITTER_NAME="u", GIT_COMMITTER_EMAIL="u@x")
    work = home / "w"
    cloned = as_user(user, ["git", "clone", f"{dev_server.url}/{REPO}+ephemeral.git", str(work)], env)
    assert cloned.returncode == 0, cloned.stderr
    (work / "f.txt").write_text("from a non-root user\n")
    give(work / "f.txt", user, 0o644)
    for args in (["add", "f.txt"], ["commit", "-qm", "work"], ["push", "origin", "HEAD:refs/heads/image-user"]):
        proc = as_user(user, ["git", *args], env, cwd=work)
        assert proc.returncode == 0, (args, proc.stderr)
    owner = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                 GIT_CONFIG_VALUE_0="Authorization: Bearer " + dev_server.token(REPO, ["git:read"]))
    assert "refs/heads/image-user" in git("ls-remote", f"{dev_server.url}/{REPO}+ephemeral.git", env=owner).stdout
    if os.geteuid() == 0:
        assert (work / ".git").stat().st_uid == user.uid  # it really ran as that user


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to mount over /opt and /usr/local/bin privately")
def test_root_defaults_are_opt_codestore_and_usr_local_bin(tmp_path: Path) -> None:
    # The real defaults, in a private mount namespace: fresh tmpfs over /opt and
    # /usr/local/bin, so this machine's own are never touched.
    gitconfig = tmp_path / "gitconfig"
    script = (
        "set -e; mount -t tmpfs tmpfs /opt; mount -t tmpfs tmpfs /usr/local/bin; "
        f"bash {ROOT}/install.sh --setup --org {ORG} >/dev/null; "
        "readlink /usr/local/bin/git-remote-codestore; stat -c %a /opt/codestore /opt/codestore/venv/bin"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODESTORE_", "GIT_"))}
    env.update(PATH="/usr/bin:/bin:" + os.environ["PATH"], GIT_CONFIG_SYSTEM=str(gitconfig), GIT_CONFIG_NOSYSTEM="1")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    link, *modes = proc.stdout.split()
    assert link == "/opt/codestore/venv/bin/git-remote-codestore" and modes == ["755", "755"]
    assert f"codestore --org {ORG}" in gitconfig.read_text()
