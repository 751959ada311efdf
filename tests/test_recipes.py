"""The provider recipes in examples/, run against the providers' real SDK signatures.

Nothing here can reach Modal, E2B or Daytona, so each SDK entry point a recipe calls is
replaced by a stand-in that binds the call to the real SDK's signature
(`inspect.signature(real).bind(...)`: a wrong name, a removed parameter or a missing
argument fails exactly as the SDK would) and records it. The sandbox itself is then
simulated honestly: what the recipe asks the provider to run in the sandbox runs for
real, as a non-root user with its own HOME in a root-built image (tests/sandboxes.py),
against the dev server and the agent. The one liberty taken: the sandbox's home
directory (`/home/user`, `/home/daytona`, ...) is that user's temporary HOME here.
The extra `codestore-git[recipes]` installs the SDKs (tests/run.sh does).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import runpy
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import DevServer, git
from tests.sandboxes import (
    ROOT,
    Image,
    User,
    as_user,
    give,
    make_home,
    sandbox_env,
    sandbox_user,
)
from tests.test_agent import REPO, Agent

EXAMPLES = ROOT / "examples"
RECIPE_INSTALL = "/opt/codestore-src/install.sh --setup --org acme"
BRANCH = "sandbox/task-1"

modal = pytest.importorskip("modal", reason="pip install -e '.[recipes]' (tests/run.sh does)")
e2b = pytest.importorskip("e2b", reason="pip install -e '.[recipes]' (tests/run.sh does)")
daytona = pytest.importorskip("daytona", reason="pip install -e '.[recipes]' (tests/run.sh does)")


@dataclass
class Call:
    name: str
    arguments: dict[str, object]  # only what the recipe passed (no defaults filled in)


@dataclass
class Box:
    """One simulated sandbox: a non-root user, its HOME, the image, the dev server's URL."""

    user: User
    home: Path
    image: Image
    provider_home: str
    extra_env: dict[str, str]
    calls: list[Call] = field(default_factory=list)

    def checked(self, name: str, real: Callable[..., object], impl: Callable[[dict[str, object]], object]) -> Callable[..., object]:
        sig = inspect.signature(real)
        # A method of an SDK object: the stand-in object plays `self`.
        method = next(iter(sig.parameters), "") == "self"

        def call(*args: object, **kwargs: object) -> object:
            bound = sig.bind(*((None,) if method else ()), *args, **kwargs)  # TypeError where the real SDK raises one
            arguments = {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}
            self.calls.append(Call(name, arguments))
            return impl(arguments)

        return call

    def local(self, text: str) -> str:
        return text.replace(self.provider_home, str(self.home))

    def sh(self, command: str, env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[int, str, str]:
        env = {k: self.local(v) for k, v in (env or {}).items()}
        full = sandbox_env(self.home, self.image, **env, **self.extra_env)
        proc = as_user(self.user, ["bash", "-c", self.local(command)], full, cwd=Path(self.local(cwd)) if cwd else self.home)
        return proc.returncode, str(proc.stdout), str(proc.stderr)

    def write(self, path: str, data: str | bytes) -> None:
        local = Path(self.local(path))
        assert local.is_relative_to(self.home), f"the simulation keeps files under the sandbox's home, not {path}"
        local.write_bytes(data.encode() if isinstance(data, str) else data)
        give(local, self.user, 0o644)  # what a provider's file API leaves: the user's file, default umask

    def names(self) -> list[str]:
        return [c.name for c in self.calls]


class Obj:
    """A plain object to hang checked methods on."""

    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)

    if TYPE_CHECKING:  # its attributes are whatever the stand-in hung on it

        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...


# -- the three SDKs' stand-ins --------------------------------------------------------------


def fake_modal(box: Box, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = {"image_commands": [], "secrets": []}
    real = modal.Image

    def image_obj(_: object) -> Obj:
        img = Obj()
        img.apt_install = box.checked("Image.apt_install", real.apt_install, lambda a: img)
        img.add_local_dir = box.checked("Image.add_local_dir", real.add_local_dir, lambda a: img)

        def run_commands(a: dict[str, object]) -> Obj:
            seen["image_commands"].extend(a["commands"])  # type: ignore[arg-type]
            return img

        img.run_commands = box.checked("Image.run_commands", real.run_commands, run_commands)
        return img

    def secret(a: dict[str, object]) -> Obj:
        seen["secrets"].append(a["env_dict"])
        return Obj(env=a["env_dict"])

    def create(a: dict[str, object]) -> Obj:
        env = dict(a.get("env") or {})  # type: ignore[call-overload]
        for s in a.get("secrets") or []:  # type: ignore[attr-defined]
            env.update(s.env)

        def exec_(x: dict[str, object]) -> Obj:
            argv = list(x["args"])  # type: ignore[call-overload]
            # Modal runs as root; the recipe drops to the image's user with runuser.
            assert argv[:4] == ["runuser", "-u", "sandbox", "--"], argv
            code, out, err = box.sh(" ".join(argv[4:]), {**env, **dict(x.get("env") or {})})  # type: ignore[call-overload]
            proc = Obj(stdout=Obj(read=lambda: out), stderr=Obj(read=lambda: err))
            proc.wait = box.checked("ContainerProcess.wait", modal.container_process.ContainerProcess.wait, lambda _: code)
            return proc

        sb = Obj()
        sb.exec = box.checked("Sandbox.exec", modal.Sandbox.exec, exec_)
        sb.terminate = box.checked("Sandbox.terminate", modal.Sandbox.terminate, lambda _: None)
        return sb

    monkeypatch.setattr(modal.Image, "debian_slim", box.checked("Image.debian_slim", real.debian_slim, image_obj))
    monkeypatch.setattr(modal.App, "lookup", box.checked("App.lookup", modal.App.lookup, lambda a: Obj()))
    monkeypatch.setattr(modal.Secret, "from_dict", box.checked("Secret.from_dict", modal.Secret.from_dict, secret))
    monkeypatch.setattr(modal.Sandbox, "create", box.checked("Sandbox.create", modal.Sandbox.create, create))
    return seen


def fake_e2b(box: Box, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    from e2b.sandbox_sync.commands.command import Commands
    from e2b.sandbox_sync.filesystem.filesystem import Filesystem

    seen: dict[str, list[Any]] = {"runs": []}
    real = e2b.Sandbox

    def create(a: dict[str, object]) -> Obj:
        sbx_env = dict(a.get("envs") or {})  # type: ignore[call-overload]

        def run(x: dict[str, object]) -> object:
            seen["runs"].append(x)
            assert x.get("user", "user") == "user", "E2B sandboxes run as `user`, not root"
            code, out, err = box.sh(str(x["cmd"]), {**sbx_env, **dict(x.get("envs") or {})}, x.get("cwd"))  # type: ignore[arg-type, call-overload]
            if code != 0:  # what the real commands.run does
                raise e2b.CommandExitException(stderr=err, stdout=out, exit_code=code, error=None)
            return e2b.CommandResult(stderr=err, stdout=out, exit_code=code, error=None)

        sbx = Obj(commands=Obj(), files=Obj())
        sbx.commands.run = box.checked("commands.run", Commands.run, run)
        sbx.files.write = box.checked("files.write", Filesystem.write, lambda x: box.write(x["path"], x["data"]))  # type: ignore[arg-type]
        sbx.kill = box.checked("Sandbox.kill", real.kill, lambda _: True)
        return sbx

    fake = Obj(create=box.checked("Sandbox.create", real.create, create))
    monkeypatch.setattr(e2b, "Sandbox", fake)
    return seen


def fake_daytona(box: Box, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    from daytona._sync.filesystem import FileSystem
    from daytona._sync.process import Process
    from daytona.common.process import ExecuteResponse

    real = daytona.Daytona
    seen: dict[str, list[Any]] = {"params": [], "execs": []}

    def create(a: dict[str, object]) -> Obj:
        params = a["params"]
        seen["params"].append(params)
        env = dict(params.env_vars or {})  # type: ignore[attr-defined]

        def exec_(x: dict[str, object]) -> object:
            seen["execs"].append(x)
            code, out, err = box.sh(str(x["command"]), {**env, **dict(x.get("env") or {})}, x.get("cwd"))  # type: ignore[arg-type, call-overload]
            return ExecuteResponse(exit_code=code, result=out + err)  # no exception: as the real one

        def chmod(x: dict[str, object]) -> None:
            Path(box.local(str(x["path"]))).chmod(int(str(x["mode"]), 8))

        sandbox = Obj(process=Obj(), fs=Obj())
        sandbox.process.exec = box.checked("process.exec", Process.exec, exec_)
        sandbox.fs.upload_file = box.checked("fs.upload_file", FileSystem.upload_file, lambda x: box.write(str(x["dst"]), x["src"]))  # type: ignore[arg-type]
        sandbox.fs.set_file_permissions = box.checked("fs.set_file_permissions", FileSystem.set_file_permissions, chmod)
        return sandbox

    def client(a: dict[str, object]) -> Obj:
        d = Obj()
        d.create = box.checked("Daytona.create", real.create, lambda x: create(x))
        d.delete = box.checked("Daytona.delete", real.delete, lambda x: None)
        return d

    monkeypatch.setattr(daytona, "Daytona", box.checked("Daytona()", real.__init__, client))
    return seen


# -- running a recipe -----------------------------------------------------------------------


@dataclass
class Scene:
    box: Box
    dev_server: DevServer
    agent: Agent
    grant: str
    grant_file: Path


@pytest.fixture
def scene(image: Image, sandbox_base: Path, dev_server: DevServer, agent: Agent, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Scene:
    dev_server.create_repo(REPO)
    grant_file = tmp_path / "owner" / "recipe.grant"
    grant_file.parent.mkdir()
    made = agent.cli("grant", "create", "--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only",
                     "--sub", "recipe", "--secret-file", str(grant_file))
    assert made.returncode == 0, made.stderr
    user = sandbox_user("codestore-sbx-a")
    box = Box(user, make_home(sandbox_base, user, "home"), image, "/nonexistent",
              # The dev server is not https://acme.code.storage: tell the sandbox where it is.
              {"CODESTORE_BASE_URL": dev_server.url})
    for k, v in {"CODESTORE_AGENT_URL": agent.url, "CODESTORE_GRANT_FILE": str(grant_file),
                 "CODESTORE_REPO": f"acme/{REPO}", "CODESTORE_BRANCH": BRANCH}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CODESTORE_PRIVATE_KEY_FILE")  # the driver side needs no key either
    return Scene(box, dev_server, agent, grant_file.read_text().strip(), grant_file)


def run_recipe(path: Path) -> int:
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def pushed_branch(scene: Scene | DevServer) -> str:
    server = scene.dev_server if isinstance(scene, Scene) else scene
    owner = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                 GIT_CONFIG_VALUE_0="Authorization: Bearer " + server.token(REPO, ["git:read"]))
    return git("ls-remote", f"{server.url}/{REPO}+ephemeral.git", f"refs/heads/{BRANCH}", env=owner).stdout


def assert_grant_only_in(scene: Scene, allowed: set[str]) -> None:
    # Threat: the grant in argv (a command line), an image layer, or a log.
    for call in scene.box.calls:
        if call.name not in allowed:
            assert scene.grant not in repr(call.arguments), call.name


def assert_sandbox_clean(scene: Scene) -> None:
    for path in scene.box.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name != "grant":
            assert scene.grant not in path.read_text(errors="replace"), path


def fail_next_run(monkeypatch: pytest.MonkeyPatch, scene: Scene) -> None:
    """Make the in-sandbox task fail: the agent's address points nowhere."""
    monkeypatch.setenv("CODESTORE_AGENT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CODESTORE_BRANCH", "sandbox/never")


# -- the recipes ----------------------------------------------------------------------------


def test_modal_recipe_runs_against_the_real_sdk_signatures(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    scene.box.provider_home = "/home/sandbox"
    seen = fake_modal(scene.box, monkeypatch)
    assert run_recipe(EXAMPLES / "modal" / "run.py") == 0
    assert BRANCH in pushed_branch(scene)
    names = scene.box.names()
    assert names[0] == "Image.debian_slim" and scene.box.calls[0].arguments.get("python_version"), "pin the Python version"
    assert RECIPE_INSTALL in seen["image_commands"]
    assert seen["secrets"] == [{"CODESTORE_GRANT": scene.grant}]  # a Modal Secret, read at run time
    assert_grant_only_in(scene, {"Secret.from_dict"})
    assert names[-1] == "Sandbox.terminate" and "ContainerProcess.wait" in names
    assert_sandbox_clean(scene)

    # Sandbox.exec does not raise: the recipe must read the exit code and fail.
    fail_next_run(monkeypatch, scene)
    assert run_recipe(EXAMPLES / "modal" / "run.py") != 0


def test_e2b_recipe_runs_against_the_real_sdk_signatures(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    scene.box.provider_home = "/home/user"
    seen = fake_e2b(scene.box, monkeypatch)
    assert run_recipe(EXAMPLES / "e2b" / "run.py") == 0
    assert BRANCH in pushed_branch(scene)
    work = next(r for r in seen["runs"] if "codestore-work" in str(r["cmd"]))
    # commands.run gives up after 60 s unless told otherwise; a clone and a task take longer.
    assert "timeout" in work and work["timeout"] in (0, None) or work["timeout"] >= 600
    grant = scene.box.home / ".config" / "codestore" / "grant"
    assert grant.read_text().strip() == scene.grant and stat.S_IMODE(grant.stat().st_mode) == 0o600
    assert_grant_only_in(scene, {"files.write"})
    assert not any("CODESTORE_GRANT" in (r.get("envs") or {}) for r in seen["runs"])  # a file, not the environment
    assert scene.box.names()[-1] == "Sandbox.kill"

    fail_next_run(monkeypatch, scene)
    with pytest.raises(e2b.CommandExitException):
        run_recipe(EXAMPLES / "e2b" / "run.py")


def test_daytona_recipe_runs_against_the_real_sdk_signatures(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    scene.box.provider_home = "/home/daytona"
    seen = fake_daytona(scene.box, monkeypatch)
    assert run_recipe(EXAMPLES / "daytona" / "run.py") == 0
    assert BRANCH in pushed_branch(scene)
    params = seen["params"][0]
    dockerfile = params.image.dockerfile()  # the real daytona.Image, built lazily
    assert f"RUN {RECIPE_INSTALL}" in dockerfile and "USER" not in dockerfile.split(RECIPE_INSTALL)[0]
    assert scene.grant not in dockerfile and scene.grant not in json.dumps(params.env_vars)
    assert_grant_only_in(scene, {"fs.upload_file", "Daytona.create"})
    grant = scene.box.home / ".config" / "codestore" / "grant"
    assert stat.S_IMODE(grant.stat().st_mode) == 0o600
    assert scene.box.names()[-1] == "Daytona.delete"

    # process.exec does not raise: the recipe must check exit_code and fail.
    fail_next_run(monkeypatch, scene)
    assert run_recipe(EXAMPLES / "daytona" / "run.py") != 0


def test_github_actions_recipe_runs_its_steps_as_a_non_root_user(scene: Scene) -> None:
    yaml = pytest.importorskip("yaml", reason="pip install -e '.[recipes]'")
    workflow = yaml.safe_load((EXAMPLES / "github-actions" / "codestore.yml").read_text())
    steps = workflow["jobs"]["task"]["steps"]
    runner_temp = scene.box.home / "runner-temp"
    runner_temp.mkdir()
    give(runner_temp, scene.box.user, 0o700)
    values = {"secrets.CODESTORE_GRANT": scene.grant, "vars.CODESTORE_AGENT_URL": scene.agent.url,
              "runner.temp": str(runner_temp), "github.run_id": "1"}

    def expand(text: str) -> str:
        return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: values[m.group(1)], text)

    for step in steps:
        if "run" not in step:
            continue
        # Threat: a secret expanded into the script text lands in argv and in the runner's logs.
        assert "secrets." not in step["run"]
        if step["run"].startswith("./install.sh"):
            assert "--setup" in step["run"]  # the image fixture ran install.sh already
            continue
        env = {"RUNNER_TEMP": str(runner_temp), "CODESTORE_REPO": f"acme/{REPO}"}
        env.update({k: expand(str(v)) for k, v in (step.get("env") or {}).items()})
        script = step["run"].replace('PATH="$HOME/.local/bin:$PATH" sh examples/sandbox/work.sh', "codestore-work")
        code, out, err = scene.box.sh(script, env)
        assert code == 0, (step["name"], err)
    assert stat.S_IMODE((runner_temp / "codestore-grant").stat().st_mode) == 0o600
    assert "ci/1" in git("ls-remote", f"codestore://acme/{REPO}+ephemeral",
                         env=dict(os.environ, CODESTORE_AGENT_URL=scene.agent.url, CODESTORE_GRANT_FILE=str(scene.grant_file))).stdout


def test_devcontainer_recipe_mounts_a_grant_socket_and_holds_no_secret() -> None:
    text = (EXAMPLES / "devcontainer" / ".devcontainer" / "devcontainer.json").read_text()
    config = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    here = EXAMPLES / "devcontainer" / ".devcontainer"
    assert (here / config["build"]["dockerfile"]).resolve() == EXAMPLES / "docker" / "Dockerfile"
    assert config["containerEnv"]["CODESTORE_AGENT_SOCK"] == "/run/codestore/agent.sock"
    assert any("target=/run/codestore/agent.sock" in m for m in config["mounts"])
    assert not any("GRANT" in k for k in config["containerEnv"]) and config["remoteUser"] != "root"


def test_every_image_recipe_installs_as_root_with_the_tested_command() -> None:
    for dockerfile in (EXAMPLES / "docker" / "Dockerfile", EXAMPLES / "e2b" / "e2b.Dockerfile"):
        text = dockerfile.read_text()
        before_install = text.split(f"RUN {RECIPE_INSTALL}")[0]
        assert f"RUN {RECIPE_INSTALL}" in text and "USER" not in before_install, dockerfile
        assert "GRANT" not in text, dockerfile  # Threat: a grant baked into an image layer


def test_the_sandbox_docs_point_at_every_recipe_file() -> None:
    docs = (ROOT / "docs" / "sandboxes.md").read_text()
    for path in sorted(p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        assert f"../{path.relative_to(ROOT)}" in docs or path.name == "Dockerfile" and "examples/docker/Dockerfile" in docs, path


FAKE_DOCKER = r'''#!/usr/bin/env python3
"""`docker run` for tests/test_recipes.py: runs the container's command on this machine.

What a container would give it: the image's PATH, only the -e variables, the --user,
and the -v mounts (a container path in a variable or argument becomes the host path).
The container's own filesystem is SIM_ROOT. Any other option is refused, so the recipe
cannot use one this stand-in does not honour.
"""
import os, subprocess, sys

args = sys.argv[1:]
if not args or args[0] != "run":
    sys.exit("fake docker: only `docker run` is simulated")
env, mounts, user, i = {}, {}, None, 1
while args[i].startswith("-"):
    opt = args[i]
    if opt == "--rm":
        i += 1
        continue
    value = args[i + 1]
    if opt == "--user":
        user = value
    elif opt == "-v":
        src, dst = value.split(":")[:2]
        mounts[dst] = src
    elif opt == "-e":
        k, _, v = value.partition("=")
        env[k] = v
    else:
        sys.exit(f"fake docker: unsupported option {opt}")
    i += 2
cmd = args[i + 1:]
root = os.environ["SIM_ROOT"]
def local(text):
    for dst, src in mounts.items():
        if dst in text:
            return text.replace(dst, src)
    return root + text if text.startswith("/tmp/") else text
env = {k: local(v) for k, v in env.items()}
env["PATH"] = os.environ["SIM_IMAGE_PATH"]
for k, v in os.environ.items():
    if k.startswith("SIM_ENV_"):
        env[k[len("SIM_ENV_"):]] = v
uid, gid = (int(x) for x in user.split(":"))
sys.exit(subprocess.run([local(c) for c in cmd], env=env, user=uid, group=gid, extra_groups=[] if os.geteuid() == 0 else None).returncode)
'''


def test_docker_recipe_runs_with_a_grant_socket_and_revokes_the_grant(
    image: Image, sandbox_base: Path, dev_server: DevServer, agent: Agent, tmp_path: Path
) -> None:
    # Docker itself is not here: a stand-in `docker run` (above) runs the container's
    # command as the --user the recipe asks for (your uid: the grant socket is 0600 and
    # yours; here the agent's owner is this test's user), with only the -e variables.
    dev_server.create_repo(REPO)
    bin_dir = tmp_path / "docker-bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    sim_root = sandbox_base / "container"
    (sim_root / "tmp").mkdir(parents=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SIM_ROOT=str(sim_root),
               SIM_IMAGE_PATH=f"{image.bin_dir}:/usr/bin:/bin", SIM_ENV_CODESTORE_BASE_URL=dev_server.url,
               CODESTORE_REPO=f"acme/{REPO}", CODESTORE_BRANCH=BRANCH)
    env.pop("CODESTORE_PRIVATE_KEY_FILE")  # the recipe's host side needs the agent, not the key
    proc = subprocess.run(["sh", str(EXAMPLES / "docker" / "run.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pushed" in proc.stdout and BRANCH in proc.stdout
    assert BRANCH in pushed_branch(dev_server)
    grants = json.loads(agent.cli("grant", "list", "--json").stdout)
    assert [g["state"] for g in grants] == ["revoked"]  # the trap revoked it when the container ended
    mints = [e for e in agent.audit() if e["event"] == "mint"]
    assert mints and {e["via"] for e in mints} == {"grant-socket"}  # the socket was the grant

    # A failing container fails the recipe, and the grant is still revoked.
    env["SIM_ENV_CODESTORE_BASE_URL"] = "http://127.0.0.1:9"
    failed = subprocess.run(["sh", str(EXAMPLES / "docker" / "run.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert all(g["state"] == "revoked" for g in json.loads(agent.cli("grant", "list", "--json").stdout))
