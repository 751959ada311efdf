"""The helpers' fast path: the code git starts on every fetch and push, named in one place.

git runs `git-credential-codestore` and `git-remote-codestore` for each request, so their
start-up is part of every `git fetch`, `git push` and `git clone`. The modules in MODULES
are everything those two programs import up to the agent client. Each imports only light
parts of the standard library at start-up: no `typing` (the type checker sees
`TYPE_CHECKING = False` blocks, Python does not), no `collections` (records.py), no `re`, `urllib`, `json`, `socket`,
`dataclasses`; and no third-party package. A module outside this list may import what it
likes: the speed tricks live here, the rest of the code stays plain.

What a helper may import depends on what it has to do, so the rule is per path (PATHS):
a request for another host, or `store`/`erase`, costs no more than the interpreter;
asking the agent for a token adds the agent client; a transfer adds `threading` (the
remote helper pumps stderr and stdin), and starts `git remote-https` with os.posix_spawn
rather than subprocess, whose import brings `re` through `locale`. Signing with the local key is the slow path: it needs cryptography, PyJWT and
keyring, so it is not part of the boundary (bench/ measures it).

tests/test_fastpath.py runs each path in its own interpreter, as the installed launchers
do, and fails when one imports a module named in HEAVY that its path does not allow.
"""

from __future__ import annotations

# Imported by the two git helpers before they mint a token (grouped by package).
MODULES = (
    "git_credential_codestore",
    "git_credential_codestore.credential",
    "git_credential_codestore.errors",
    "git_credential_codestore.gitenv",
    "git_credential_codestore.trace",  # CODESTORE_TRACE lines: os and sys only
    "git_credential_codestore.lines",
    "git_credential_codestore.records",  # named tuples without importing collections
    "git_credential_codestore.vocab",
    "git_credential_codestore.config",
    "git_credential_codestore.config_cache",
    "git_credential_codestore.files",  # only to refresh the parsed config after an edit
    "git_credential_codestore.secrets",
    "git_credential_codestore.source",
    "git_credential_codestore.remotes",
    "git_credential_codestore.agent",
    "git_credential_codestore.agent.discovery",
    "git_credential_codestore.agent.client",
    "git_credential_codestore.agent.wire",
    "git_credential_codestore.agent.workload",  # finding a workload identity: os only until one is used
    "remote_helper",
    "remote_helper.main",
    "remote_helper.protocol",
    "remote_helper.transport",
)

# Modules whose import is a measurable part of a helper's run (milliseconds each, or a
# chain of them), and every third-party package.
HEAVY = (
    "collections", "typing", "re", "urllib.parse", "ipaddress", "subprocess", "tomllib", "tomli", "json",
    "socket", "ssl", "hashlib", "dataclasses", "inspect", "email", "http.client", "logging",
    "cryptography", "jwt", "keyring", "platformdirs", "click",
)

# path -> the HEAVY modules that path may import, and why.
PATHS: dict[str, tuple[str, ...]] = {
    # git asks every helper about every host: ours must answer "not mine" at once.
    "credential get, another host": (),
    "credential store and erase": (),
    # The owner's agent at the default socket, org and base URL from config.toml.
    "credential get via the agent, config.toml": (),
    # A sandbox: the agent's socket and a grant in the environment, no key anywhere.
    "credential get via a grant": (),
    # git starts the remote helper and asks for its capabilities before any command.
    "remote helper, capabilities only": (),
    # A read through codestore://: a token from the agent, then git remote-https runs, with
    # threads pumping its streams (threading imports collections for its deque).
    "remote helper ls-remote via the agent": ("collections",),
}
