"""`codestore setup`: point git's credential machinery for our host at our helper.

For the configured base URL it sets, in the global git config:

    credential.<base>.helper = ""          reset: no earlier helper (store, osxkeychain,
                                           cache) may save or serve our short-lived tokens
    credential.<base>.helper = codestore   git runs `git-credential-codestore` from PATH,
                                           so upgrades never leave a stale absolute path
    credential.<base>.useHttpPath = true   git sends the repository path, so each token
                                           names exactly one repository

What it added is recorded in a state file, so `--undo` removes exactly that and
nothing a user set by hand. Every function takes the environment git runs with
(default: this process's), so a caller such as `codestore demo` never rewrites its own.

`codestore setup --system` (run as root while building an image) writes the same
entries to git's system config instead, for every user of the machine, and names the
org and base URL in the helper line itself (`helper = codestore --org acme`): the users
who run git later have no codestore configuration of their own, and setting up needs
no key and no network. `--system --undo` removes entries that still hold what setup
wrote (no state file: the image's root is not the user who will undo).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from . import git, jsontext
from .config import Config
from .vocab import split_url

HELPER = "codestore"


def state_path(env: Mapping[str, str] | None = None) -> str:
    from .config import user_dir

    return os.path.join(user_dir("state", env), "setup.json")


def _load_state(env: Mapping[str, str] | None = None) -> dict[str, dict[str, list[str]]]:
    """What setup changed, per base URL: only entries setup itself writes (`wanted`), with
    lists of strings as values; anything else in the file (damaged, edited) is ignored."""
    from .files import read_bounded

    try:
        data = jsontext.loads(read_bounded(state_path(env), "codestore's setup record"))
    except (FileNotFoundError, ValueError):
        return {}
    state: dict[str, dict[str, list[str]]] = {}
    for base, originals in (data.items() if isinstance(data, dict) else ()):
        if not isinstance(originals, dict):
            continue
        ours = wanted(base)  # never restore a key setup does not write (core.sshCommand, say)
        state[base] = {k: v for k, v in originals.items()
                       if k in ours and isinstance(v, list) and all(isinstance(x, str) for x in v)}
    return state


def _save_state(state: Mapping[str, Mapping[str, list[str]]], env: Mapping[str, str] | None = None) -> None:
    from .files import write_atomic

    path = state_path(env)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, json.dumps(state, indent=1), 0o600)


def helper_line(cfg: Config, system: bool) -> str:
    """What git runs: `codestore`, or for a system set-up `codestore --org ORG [--base-url URL]`."""
    if not system:
        return HELPER
    line = f"{HELPER} --org {cfg.require_org()}"
    return line + (f" --base-url {cfg.base_url}" if cfg.base_url_setting else "")


def is_ours(helper: str) -> bool:
    return helper == HELPER or helper.startswith(HELPER + " ")


def wanted(base_url: str, helper: str = HELPER) -> dict[str, list[str]]:
    return {
        f"credential.{base_url}.helper": ["", helper],
        f"credential.{base_url}.useHttpPath": ["true"],
    }


def helper_chain(base_url: str, env: Mapping[str, str] | None = None) -> list[str]:
    return git.config_get_all(f"credential.{base_url}.helper", env=env)


def _applies(url: str, base_url: str) -> bool:
    """Roughly git's urlmatch: same scheme and host, and a path prefix of ours."""
    u, b = split_url(url if "://" in url else "https://" + url), split_url(base_url)
    path = u.path.rstrip("/")
    return (u.scheme, u.netloc.lower()) == (b.scheme, b.netloc.lower()) and (
        not path or b.path.rstrip("/") == path or b.path.startswith(path + "/")
    )


def effective_chain(base_url: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The helpers git will run for our URL, across every config file, in git's order.

    git appends `credential.helper` and matching `credential.<url>.helper` values in the
    order it reads them; an empty value clears what came before. A helper added *after*
    our entries (say `git config --global credential.helper store` run later) is still
    asked to `store` our tokens, so a reset before ours is not enough on its own.
    """
    proc = git.run(["config", "--get-regexp", r"^credential\..*helper$"], ok=(0, 1), env=env)
    chain: list[str] = []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        middle = key[len("credential.") : -len(".helper")] if key.lower() != "credential.helper" else ""
        if key.lower() == "credential.helper" or _applies(middle, base_url):
            if value == "":
                chain.clear()
            else:
                chain.append(value)
    return chain


def is_configured(base_url: str, env: Mapping[str, str] | None = None) -> bool:
    """Set up for base_url in the global config, or in the system config (`--system`)."""
    for scope in ("--global", "--system"):
        helpers = git.config_get_all(f"credential.{base_url}.helper", scope=scope, env=env)
        if len(helpers) == 2 and helpers[0] == "" and is_ours(helpers[1]):
            return git.config_get_all(f"credential.{base_url}.useHttpPath", scope=scope, env=env) == ["true"]
    return False


def setup(cfg: Config, env: Mapping[str, str] | None = None, system: bool = False) -> list[str]:
    """Configure git for cfg.base_url; returns the keys it changed (none when already set)."""
    base = cfg.base_url
    scope = "--system" if system else "--global"
    state = {} if system else _load_state(env)
    originals = state.setdefault(base, {})
    changed = []
    for key, values in wanted(base, helper_line(cfg, system)).items():
        current = git.config_get_all(key, scope=scope, env=env)
        if current == values:
            continue
        # The whole list is replaced: a helper left after ours would still be asked
        # to `store` our tokens. The first setup's originals are what undo restores.
        originals.setdefault(key, current)
        git.run(["config", scope, "--unset-all", key], ok=(0, 5), env=env)
        for v in values:
            git.run(["config", scope, "--add", key, v], env=env)
        changed.append(key)
    if not system:
        _save_state(state, env)
    return changed


def undo_system(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Remove the system entries that still hold exactly what `setup --system` wrote."""
    base = cfg.base_url
    removed = []
    for key, values in wanted(base, helper_line(cfg, True)).items():
        if git.config_get_all(key, scope="--system", env=env) == values:
            git.run(["config", "--system", "--unset-all", key], ok=(0, 5), env=env)
            removed.append(key)
    if removed:
        _drop_empty_section(base, "--system", env)
    return removed


def _drop_empty_section(base: str, scope: str, env: Mapping[str, str] | None) -> None:
    """Leave no empty [credential "..."] section behind."""
    prefix = f"credential.{base}.".lower()
    names = git.run(["config", scope, "--name-only", "--list"], ok=(0, 1), env=env).stdout.splitlines()
    if not any(n.lower().startswith(prefix) for n in names):
        git.run(["config", scope, "--remove-section", f"credential.{base}"], ok=(0, 128), env=env)


def recorded(env: Mapping[str, str] | None = None) -> list[str]:
    """Every base URL setup has configured and not undone, whichever org or --base-url it
    was for: what `setup --undo` with no org named undoes."""
    return list(_load_state(env))


def undo(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    return undo_url(cfg.base_url, env)


def undo_url(base: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Remove exactly what setup changed for `base`, restoring what was there before.

    Without a record of it (the state file lost or damaged), the entries that still hold
    exactly what setup writes are removed, as `--system --undo` does: setup's own work
    can always be undone, and nothing a user set by hand is touched.
    """
    state = _load_state(env)
    originals = state.pop(base, None)
    if originals is None:
        originals = {key: [] for key, values in wanted(base).items()
                     if git.config_get_all(key, scope="--global", env=env) == values}
    for key, values in originals.items():
        git.run(["config", "--global", "--unset-all", key], ok=(0, 5), env=env)
        for v in values:
            git.run(["config", "--global", "--add", key, v], env=env)
    _drop_empty_section(base, "--global", env)
    _save_state(state, env)
    return list(originals)
