"""Where tokens come from: the local key, or an agent that holds it.

Both git helpers ask `get_token`; it decides which source serves the request and
imports only that source's dependencies (the agent path needs no crypto at all).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from .config import Config
from .secrets import Token


class TokenRequest(NamedTuple):
    """What a helper needs: one repository, in one namespace, with these scopes."""

    repo: str
    scopes: tuple[str, ...]
    ephemeral: bool = False
    ttl: int | None = None
    # [pattern, [ops]] rules for the `refs` claim (Code Storage enforces them on push).
    refs: Sequence[tuple[str, list[str]]] = ()
    # Which program asks, for the audit log: "credential", "remote", "cli".
    purpose: str = "cli"


class TokenSource(Protocol):
    def mint(self, request: TokenRequest) -> Token: ...


class LocalKeySource:
    """Signs with the org's private key found on this machine."""

    def __init__(self, cfg: Config, env: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.env = env

    def mint(self, request: TokenRequest) -> Token:
        from . import keys, tokens

        key, _ = keys.load_private_key(self.cfg, self.env)
        return tokens.mint(
            key,
            org=self.cfg.require_org(),
            repo=request.repo,
            scopes=request.scopes,
            ttl=request.ttl or self.cfg.ttl,
            sub=self.cfg.sub,
            kid=self.cfg.kid,
            refs=list(request.refs) or None,
        )


def choose_source(cfg: Config, env: Mapping[str, str] | None = None) -> TokenSource:
    """The agent when one is configured (a grant, or an explicit socket/URL), else the local key."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in ("CODESTORE_AGENT_URL", "CODESTORE_AGENT_SOCK", "CODESTORE_GRANT", "CODESTORE_GRANT_FILE")):
        from .agent.client import AgentSource

        return AgentSource.from_env(cfg, env)
    return LocalKeySource(cfg, env)


def get_token(request: TokenRequest, cfg: Config, env: Mapping[str, str] | None = None) -> Token:
    return choose_source(cfg, env).mint(request)
