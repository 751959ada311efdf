"""Where tokens come from: the local key, or an agent that holds it.

Both git helpers ask `get_token`; it decides which source serves the request and
imports only that source's dependencies (the agent path needs no crypto at all).
"""

from __future__ import annotations

import os

from .config import Config
from .secrets import Token
from .vocab import TokenRequest

TYPE_CHECKING = False  # typing's import is a cost on every git request
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Protocol

    from .agent.client import AgentSource

    class TokenSource(Protocol):
        def mint(self, request: TokenRequest) -> Token: ...

        # Put a checked push/promote report (audit.validate_report) in the audit trail
        # that belongs with this source: the agent's, or the local file.
        def record(self, report: Mapping[str, object]) -> None: ...


class LocalKeySource:
    """Signs with the org's private key found on this machine."""

    def __init__(self, cfg: Config, env: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.env = env

    def mint(self, request: TokenRequest) -> Token:
        from . import keys, tokens, trace

        if request.narrow:
            # A helper left the decision to an agent that cannot answer (the owner's
            # fallback): local configuration decides, as the agent would have.
            request = request._replace(scopes=self.cfg.narrow(request.repo, request.ephemeral, request.scopes), narrow=False)
        self.cfg.require_org()  # the token's iss: without an org, "no key found" would be the wrong lead
        key, where = keys.load_private_key(self.cfg, self.env)
        trace.say(
            "key",
            f"signing {request.repo} ({' '.join(request.scopes)}) with the {tokens.algorithm_for(key)} key from {where}, "
            f"kid {self.cfg.kid or '(none)'}",
            self.env,
        )
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

    def record(self, report: Mapping[str, object]) -> None:
        from . import audit

        audit.append_local(audit.local_trail(self.env), {**report, "grant": None, "sub": self.cfg.sub, "via": "local-key"})


class FallbackSource:
    """The agent when it answers; the local key when it is down (or holds another key).

    When the local key is missing too, the agent's one-line error (how to start it) is
    what the user sees: that is the likelier fix. An agent that accepts and does not answer
    (stopped, wedged) is given FAILOVER_REPLY_TIMEOUT before the local key signs, not the
    whole reply deadline; without a local key it gets the rest of that deadline.
    """

    def __init__(self, agent: AgentSource, local: TokenSource) -> None:
        self.agent = agent
        self.local = local
        self.used: TokenSource = agent

    def mint(self, request: TokenRequest) -> Token:
        from .agent.client import FAILOVER_REPLY_TIMEOUT, REPLY_TIMEOUT, AgentMismatch, AgentSilent, AgentUnavailable
        from .errors import KeyNotFound

        try:
            self.used = self.agent
            self.agent.reply_timeout = FAILOVER_REPLY_TIMEOUT
            return self.agent.mint(request)
        except (AgentUnavailable, AgentMismatch) as agent_error:
            from .trace import say

            say("source", f"agent not used ({agent_error}); falling back to the local key")
            try:
                self.used = self.local
                return self.local.mint(request)
            except KeyNotFound:
                if isinstance(agent_error, AgentMismatch):
                    raise  # the agent holds another key than the one named here, and that one is missing: say so
                if not isinstance(agent_error, AgentSilent):
                    raise agent_error from None
        self.used = self.agent  # no key here: the agent that was only slow is the one way left
        self.agent.reply_timeout = REPLY_TIMEOUT - FAILOVER_REPLY_TIMEOUT
        return self.agent.mint(request)

    def record(self, report: Mapping[str, object]) -> None:
        """Into the trail of whichever source minted; the local file if the agent went away."""
        from .agent.client import AgentUnavailable

        try:
            self.used.record(report)
        except AgentUnavailable:
            self.local.record(report)


def choose_source(cfg: Config, env: Mapping[str, str] | None = None) -> TokenSource:
    """Which source serves this request. In order:

    1. An explicitly configured agent (CODESTORE_AGENT_URL/_SOCK, CODESTORE_GRANT/_FILE).
       With a grant there is no fallback: a sandbox gets the agent's answer or nothing.
       Without one (the owner), a down agent falls back to the local key.
    2. CODESTORE_AGENT=off: the local key only.
    3. An agent at the default socket (a stat, no connect unless the file exists),
       falling back to the local key if it does not answer.
    4. CODESTORE_AGENT=auto and a key file: start an agent in the background for the
       next requests (it exits after AUTOSTART_IDLE idle seconds), and sign this one
       locally, so the first request is never slower than without an agent.
    5. The local key.
    """
    from .agent import discovery

    env = os.environ if env is None else env
    from .trace import say

    local = LocalKeySource(cfg, env)
    # A grant or agent address in the environment serves the org the environment configures,
    # never an [orgs.*] section (its tokens would be signed for, and sent to, another org).
    if cfg.uses_env and discovery.agent_named(env):
        from .agent.client import AgentSource

        agent = AgentSource.from_env(cfg, env)
        # A grant or a workload identity: the agent's answer or nothing, never the local key.
        if agent.grant is not None or agent.identity is not None:
            say("source", f"the agent at {agent.endpoint} with a {'grant' if agent.grant is not None else 'workload identity'} "
                "(no fallback: the agent is the policy)", env)
            return agent
        say("source", f"the agent at {agent.endpoint}, falling back to the local key", env)
        return FallbackSource(agent, local)
    mode = discovery.mode(env)
    if mode == "off":
        say("source", "the local key (CODESTORE_AGENT=off)", env)
        return local
    import _socket  # built in: no import cost

    if not hasattr(_socket, "AF_UNIX"):
        # Windows: the agent's Unix socket is POSIX-only; CODESTORE_AGENT_URL still works.
        say("source", "the local key (no Unix sockets on this platform)", env)
        return local
    from .agent.client import AgentSource
    from .agent.discovery import Endpoint

    path = discovery.default_socket(env)
    running = os.path.exists(path)
    if mode == "auto" and discovery.key_file_present(cfg, env) and not discovery.answers(path, running):
        discovery.spawn(path, idle_timeout=discovery.AUTOSTART_IDLE, env=env)
        say("source", f"the local key; started an agent at {path} for the next requests", env)
        return local
    if running:
        say("source", f"the agent at {path}, falling back to the local key", env)
        return FallbackSource(AgentSource(Endpoint("unix", path), None, cfg, env), local)
    say("source", f"the local key (no agent at {path})", env)
    return local


def get_token(request: TokenRequest, cfg: Config, env: Mapping[str, str] | None = None) -> Token:
    return choose_source(cfg, env).mint(request)
