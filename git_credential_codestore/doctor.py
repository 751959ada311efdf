"""`codestore doctor`: check each thing a git fetch depends on and say what to fix."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from . import git
from .config import Config
from .errors import CodestoreError, redact

MIN_GIT = (2, 39, 0)
EXPIRY_GIT = (2, 41, 0)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False


def _check(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except CodestoreError as e:
        return Check(name, False, str(e))


def check_config(cfg: Config, env: Mapping[str, str] | None = None) -> str:
    from .agent import discovery

    text = f"org {cfg.require_org()}, git {cfg.base_url}, api {cfg.api_url}, ttl {cfg.ttl}s"
    if env is not None and cfg.uses_env and discovery.agent_named(env):
        return f"{text}, scopes decided by the agent the environment names"  # local scopes are not applied
    return f"{text}, scopes {' '.join(cfg.scopes)}"


def _joined(values: object, sep: str) -> str:
    return sep.join(map(str, values)) if isinstance(values, list) else ""


def check_key(cfg: Config, env: Mapping[str, str]) -> str:
    from .agent import discovery

    if cfg.uses_env and discovery.agent_named(env):  # as source.choose_source: not for [orgs.*]
        from .agent.client import AgentSource, call_any

        agent = AgentSource.from_env(cfg, env)
        if agent.grant is None and agent.identity is not None:
            ep, status, _ = call_any(agent.endpoints, "GET", "/v1/ping", env=env)
            if status != 200:
                raise CodestoreError(f"the codestore agent at {ep} answered HTTP {status} to a ping; check: codestore agent status")
            return f"the agent at {ep} answers; the workload identity in {agent.identity.where} is exchanged at each git request"
        # A grant holder's own grant, not a test token: that would need a repository the
        # grant covers, and each run left a refusal in the audit trail.
        grant = agent.own_grant()
        if grant is not None:
            what = f"grant {grant.get('id')} ({grant.get('state')}) at {agent.endpoint}"
            if grant.get("state") != "active":
                raise CodestoreError(f"{what}: git will be refused; ask the grant's owner for a new one")
            only = " (ephemeral only)" if grant.get("ephemeral_only") else ""
            return f"{what}: {_joined(grant.get('scopes'), ' ')} on {_joined(grant.get('repos'), ', ')}{only}"
        from .source import get_token
        from .vocab import TokenRequest

        get_token(TokenRequest("doctor-check", ("git:read",), purpose="doctor"), cfg, env)
        return "the agent minted a test token"
    from . import keys, tokens

    key, where = keys.load_private_key(cfg, env)
    return f"{tokens.algorithm_for(key)} key from {where}" + (f", kid {cfg.kid}" if cfg.kid else ", no kid (set CODESTORE_KID)")


def check_git(env: Mapping[str, str]) -> Check:
    try:
        v = git.version(env)
    except CodestoreError as e:
        return Check("git", False, str(e))
    text = ".".join(map(str, v))
    if v < MIN_GIT:
        return Check("git", False, f"git {text} is older than 2.39; upgrade git")
    if v < EXPIRY_GIT:
        return Check("git", True, f"git {text} (ignores password_expiry_utc; fine, tokens are minted per process)", warning=True)
    return Check("git", True, f"git {text}")


def check_helper(cfg: Config, env: Mapping[str, str] | None = None) -> str:
    from .setup import effective_chain, is_configured, is_ours

    if not is_configured(cfg.base_url, env):
        raise CodestoreError(f"git is not set up for {cfg.base_url}; run: codestore setup")
    chain = effective_chain(cfg.base_url, env)
    if len(chain) != 1 or not is_ours(chain[0]):
        others = [h for h in chain if not is_ours(h)]
        raise CodestoreError(
            f"git would also run {', '.join(repr(h) for h in others)} for {cfg.base_url}, which can store our tokens; "
            "remove it or move it above codestore's entries (then run: codestore setup)"
        )
    return f"git asks only codestore for {cfg.base_url}; useHttpPath on"


def check_server(cfg: Config) -> str:
    try:
        with urllib.request.urlopen(cfg.base_url + "/", timeout=5) as r:
            return f"{cfg.base_url} answers (HTTP {r.status})"
    except urllib.error.HTTPError as e:
        return f"{cfg.base_url} answers (HTTP {e.code})"
    except (urllib.error.URLError, OSError) as e:
        raise CodestoreError(f"{cfg.base_url} is unreachable ({redact(str(getattr(e, 'reason', e)))}); check the network or CODESTORE_BASE_URL") from None


def run_checks(env: Mapping[str, str] | None = None, every_org: bool = True) -> list[Check]:
    """Every check, for every org configured here (or only the one `config.load` picks).

    With one org the checks are named config, key, git, git setup, server; with several,
    each org's are suffixed with ` [NAME]` and git is checked once.
    """
    from . import config

    env = os.environ if env is None else env
    try:
        orgs = config.all_orgs(env) if every_org else [config.load(env)]
        for cfg in orgs:
            check_config(cfg)
    except CodestoreError as e:
        return [Check("config", False, str(e)), check_git(env)]
    out: list[Check] = []
    for cfg in orgs:
        tag = f" [{cfg.name or cfg.org}]" if len(orgs) > 1 else ""
        # partial binds this org's cfg (a lambda would see the loop variable).
        out += [
            _check("config" + tag, partial(check_config, cfg, env)),
            _check("key" + tag, partial(check_key, cfg, env)),
        ]
        if cfg is orgs[0]:
            out.append(check_git(env))
        out += [
            _check("git setup" + tag, partial(check_helper, cfg, env)),
            _check("server" + tag, partial(check_server, cfg)),
        ]
    return out
