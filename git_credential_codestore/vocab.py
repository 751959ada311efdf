"""codestore's vocabulary: the words every part shares, each defined once.

    switches      the false words of our on/off environment variables
    scopes        the four Code Storage scopes; `git:write` implies `git:read`
    TTLs          DEFAULT_TTL, the MIN_TTL..MAX_TTL bounds and their one check
    repositories  the one repository-id validator, the `+ephemeral`/`+import` suffixes
    URLs          one splitter (no urllib), loopback hosts, a base URL's path prefix
    ref policies  Code Storage's `refs` claim: ordered [pattern, [ops]], first match wins
    requests      `TokenRequest`: what a helper asks a token source (or the agent) for
    branches      the one branch-name rule (git check-ref-format --branch's, for the
                  names we take: review, promote, branch delete, the dev server)

Every program uses these: the credential helper, the remote helper, the agent client
and its policy, the token minter, the grant store and the dev server. The git helpers
import this module on every fetch and push, so it is standard library only and
import-light: no typing, re, urllib, json or collections (records.record, not a
dataclass or a namedtuple, whose imports every git request would pay).
"""

from __future__ import annotations

from .errors import ConfigError
from .records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

# -- switches ------------------------------------------------------------------------------

# The words that turn one of our environment switches off (CODESTORE_TRACE, CODESTORE_DEBUG,
# CODESTORE_AGENT), in any case, as git reads a false trace key; unset is off too.
# (git's own variables are read by gitenv.py, rule for rule as git reads each.)
FALSE_WORDS = ("", "0", "false", "no", "off")
TRUE_WORDS = ("1", "true", "yes", "on")


def is_off(value: str) -> bool:
    return value.strip().lower() in FALSE_WORDS


# -- scopes --------------------------------------------------------------------------------

SCOPES = ("git:read", "git:write", "repo:write", "org:read")
READ = ("git:read",)
READ_WRITE = ("git:read", "git:write")


def with_implied(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes, deduplicated in order, with `git:read` added before `git:write` if missing.

    Code Storage: `git:write` includes read.
    """
    items = list(dict.fromkeys(scopes))
    if "git:write" in items and "git:read" not in items:
        items.insert(items.index("git:write"), "git:read")
    return tuple(items)


def allows(granted: Iterable[str], scope: str) -> bool:
    """Whether scopes `granted` cover `scope` (write implies read)."""
    return scope in with_implied(granted)


def is_org(name: str) -> bool:
    """An org name: a DNS label (it is the first label of the org's host), 1..63 ASCII
    letters, digits and '-', not starting or ending with '-'. So also never a path."""
    return (
        0 < len(name) <= 63
        and all(c.isascii() and (c.isalnum() or c == "-") for c in name)
        and not name.startswith("-")
        and not name.endswith("-")
    )


def parse_scopes(value: object, where: str) -> tuple[str, ...]:
    """Scopes as a space/comma separated string or a list; `git:write` implies `git:read`."""
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ConfigError(f"{where}: scopes must be a string like \"git:read git:write\"")
    for s in items:
        if s not in SCOPES:
            raise ConfigError(f"{where}: unknown scope {s[:40]!r}; known scopes: {' '.join(SCOPES)}")
    return with_implied(items)


# -- TTLs ----------------------------------------------------------------------------------

DEFAULT_TTL = 300
MIN_TTL = 30
# Code Storage has no revocation: a token is valid until `exp`, so the hard maximum is
# how long a leaked token can live.
MAX_TTL = 3600


def check_ttl(value: object, where: str, error: Callable[[str], Exception] = ConfigError) -> int:
    """A TTL in seconds within MIN_TTL..MAX_TTL, or `error` saying why not."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        ttl = int(value)
    except (TypeError, ValueError):
        raise error(f"{where}: TTL must be a whole number of seconds, got {str(value)[:40]!r}") from None
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise error(f"{where}: TTL {ttl}s is outside {MIN_TTL}..{MAX_TTL}s; short-lived tokens are the point")
    return ttl


# -- repositories --------------------------------------------------------------------------

EPHEMERAL_SUFFIX = "+ephemeral"
IMPORT_SUFFIX = "+import"
# `{repo}+ephemeral.git` and `{repo}+import.git` are served with the base repository's
# token (its `repo` claim is the plain id), as Code Storage does.
SUFFIXES = (EPHEMERAL_SUFFIX, IMPORT_SUFFIX)
MAX_REPO_ID = 200


def validate_repo_id(repo: str) -> str:
    """The one repository-id check; ids no repository can have are rejected, never normalised.

    An id is 1..200 ASCII letters, digits and `-_./`, starts with a letter or digit,
    and is `/`-separated components none of which is empty, `.` or `..`, or ends in
    `.git` (so `a.git/objects` cannot name a file inside repository `a`, and the dev
    server's routes split `<id>.git/...` in exactly one place). No `%` (nothing decoded
    later), no `+` (the namespace suffixes are not part of the id).
    """
    bad = (
        not isinstance(repo, str)
        or not repo
        or len(repo) > MAX_REPO_ID
        or not (repo[0].isascii() and repo[0].isalnum())
        or any(not (c.isascii() and (c.isalnum() or c in "-_./")) for c in repo)
        or any(part in ("", ".", "..") or part.endswith(".git") for part in repo.split("/"))
    )
    if bad:
        shown = repr(repo[:MAX_REPO_ID + 1]) if isinstance(repo, str) else type(repo).__name__
        raise ConfigError(
            f"{shown} is not a repository id (letters, digits, '-', '_', '.', '/'; "
            "starting with a letter or digit; no component may be empty, '.', '..' or end in .git)"
        )
    return repo


def percent_decode(text: str) -> str:
    """`team%2Fapp` -> `team/app`, as Code Storage reads repository ids in URL paths.

    UTF-8 %XX escapes only (no `+` for space: this is a path). A malformed escape is
    an error, not literal text. Not urllib.parse: its import is a cost every git
    request would pay.
    """
    if "%" not in text:
        return text
    out, i = bytearray(), 0
    raw = text.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25:  # %
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in b"0123456789abcdefABCDEF" for c in pair):
                raise ConfigError(f"{text!r} has a bad %-escape; write %XX with two hex digits")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{text!r} does not decode to UTF-8 text") from None


def split_repo_suffix(path: str) -> tuple[str, str]:
    """`team/app+import.git` (or `team%2Fapp%2Bimport.git`) -> ("team/app", "+import").

    The suffix is "" for the default namespace. The one place a URL path becomes a
    repository id: escapes are decoded once, before the suffixes are read and the id is
    validated, so an encoded `..`, `+` or `.git` is judged exactly like a literal one.
    """
    repo = percent_decode(path.strip("/"))
    if repo.endswith(".git"):
        repo = repo[:-4]
    suffix = ""
    for s in SUFFIXES:
        if repo.endswith(s):
            repo, suffix = repo[: -len(s)], s
            break
    validate_repo_id(repo)
    return repo, suffix


def split_repo_path(path: str) -> tuple[str, bool]:
    """`team/app+ephemeral.git` -> ("team/app", True). Raises ConfigError on a bad id."""
    repo, suffix = split_repo_suffix(path)
    return repo, suffix == EPHEMERAL_SUFFIX


# -- URLs ----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 in dotted-quad form, ::1 or localhost: where plain http may carry a token.

    Not ipaddress (its import is a cost every git operation would pay). Forms it would
    also accept, such as a long-form ::1 or 127.1, count as not loopback: the safe side.
    """
    if host.lower() in ("localhost", "::1"):
        return True
    parts = host.split(".")
    return (
        len(parts) == 4
        and parts[0] == "127"
        # ASCII digits, no leading zeros (0177 is octal to some parsers), at most 255.
        and all(p.isascii() and p.isdigit() and str(int(p)) == p and int(p) <= 255 for p in parts)
    )


class SplitURL(record("SplitURL", "scheme netloc path query fragment")):
    """`scheme://netloc/path?query#fragment`, split without urllib (an import every git
    request would pay). Only for URLs we compare and validate, never to normalise."""

    __slots__ = ()

    @property
    def userinfo(self) -> str | None:
        user, at, _ = self.netloc.rpartition("@")
        return user if at else None

    @property
    def hostport(self) -> str:
        """host[:port] without any userinfo, as git names a host to a credential helper."""
        return self.netloc.rpartition("@")[2]

    @property
    def host(self) -> str:
        """The host, lower-cased, without brackets around an IPv6 address."""
        hp = self.hostport
        if hp.startswith("["):
            return hp[1:].partition("]")[0].lower()
        return hp.partition(":")[0].lower()

    @property
    def port(self) -> int | None:
        """The explicit port; ValueError when it is not a number in 0..65535 (or when an
        IPv6 host's "]" is missing, as in http://[::1, so nothing else guesses the host)."""
        hp = self.hostport
        if hp.startswith("[") and "]" not in hp:
            raise ValueError(f"unclosed [ in {hp[:60]!r}")
        rest = hp.partition("]")[2] if hp.startswith("[") else hp.partition(":")[1] + hp.partition(":")[2]
        if not rest:
            return None
        digits = rest[1:] if rest.startswith(":") else "x"
        if not (digits.isascii() and digits.isdigit()) or int(digits) > 65535:
            raise ValueError(f"bad port in {hp[:60]!r}")
        return int(digits)

    @property
    def origin(self) -> str:
        """scheme://netloc, for comparing servers."""
        return f"{self.scheme}://{self.netloc}"


def split_url(url: str) -> SplitURL:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isascii() or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return SplitURL("", "", url, "", "")
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return SplitURL(scheme.lower(), netloc, slash + path, query, fragment)


def path_under(base_url: str, path: str) -> str | None:
    """`path` relative to the base URL's path prefix (no leading `/`); None when outside it.

    The one place a base URL like `https://host/git` has its `/git` stripped from a
    request path (the credential helper's `path`, a remote's URL).
    """
    prefix = split_url(base_url).path.strip("/")
    path = path.lstrip("/")
    if not prefix:
        return path
    if not path.startswith(prefix + "/"):
        return None
    return path[len(prefix) + 1 :]


# -- ref policies --------------------------------------------------------------------------

REF_OPS = ("no-push", "no-force-push", "verify-sig")
REF_POLICY_EXAMPLE = '[["refs/heads/main", ["no-push"]], ["refs/heads/feature/*", ["no-force-push"]]]'

# A policy is a tuple of (pattern, (op, ...)) rules, in order; the first match wins and
# empty ops are an explicit allow. Patterns, as Code Storage reads them: a full ref
# (`refs/heads/main`), a prefix glob ending in `*` (`refs/heads/feature/*`), the catch-all
# `*`, or a short branch name (`main`, taken as `refs/heads/main`). Short names are
# written out in full when a policy is parsed, so every consumer sees one spelling.
if TYPE_CHECKING:
    RefPolicy = list[tuple[str, list[str]]]


def _ref_pattern(pattern: object) -> str | None:
    if not isinstance(pattern, str) or not pattern or len(pattern) > 256:
        return None
    if any(c.isspace() or ord(c) < 32 or c in "\x7f\\:?[^~" for c in pattern) or "*" in pattern[:-1]:
        return None
    if pattern == "*" or pattern.startswith("refs/"):
        return pattern
    return "refs/heads/" + pattern


def ref_policy(rules: object, error: Callable[[str], Exception] = ConfigError) -> RefPolicy:
    """Validate the `refs` claim (a list of [pattern, [ops]]) into a RefPolicy."""
    if not isinstance(rules, (list, tuple)):
        raise error(f"a ref policy is a list of [pattern, [ops]] rules, e.g. {REF_POLICY_EXAMPLE}")
    out: RefPolicy = []
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
            raise error(f"a ref rule is [pattern, [ops]], as in {REF_POLICY_EXAMPLE}")
        pattern, ops = _ref_pattern(rule[0]), rule[1]
        if pattern is None:
            raise error(f"bad ref pattern {str(rule[0])[:80]!r}: a ref (refs/heads/main, or main) or a prefix ending in *, "
                        "without spaces or any of \\:?[^~")
        if not isinstance(ops, (list, tuple)):
            raise error(f"the ops of the rule for {pattern} must be a list, as in {REF_POLICY_EXAMPLE}")
        unknown = [str(op)[:40] for op in ops if not (isinstance(op, str) and op in REF_OPS)]
        if unknown:
            raise error(f"unknown ref op {unknown[0]!r} in the rule for {pattern}; ops: {', '.join(REF_OPS)}")
        out.append((pattern, list(ops)))
    return out


def legacy_ops_rule(ops: object, error: Callable[[str], Exception] = ConfigError) -> RefPolicy:
    """The deprecated top-level `ops` claim: a `*` rule with those ops."""
    return ref_policy([["*", ops]], error)


def parse_ref_policy(text: str, error: Callable[[str], Exception] = ConfigError) -> RefPolicy:
    """The command-line form: `refs/heads/main=no-push;feature/*=no-force-push`."""
    rules = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        pattern, sep, ops = item.partition("=")
        if not sep:
            raise error(f"bad ref policy {item[:80]!r}: want PATTERN=OP[,OP] (e.g. refs/heads/main=no-push)")
        rules.append([pattern.strip(), [o.strip() for o in ops.split(",") if o.strip()]])
    return ref_policy(rules, error)


def ref_matches(pattern: str, ref: str) -> bool:
    """Whether a (parsed) pattern covers a full ref name."""
    if pattern.endswith("*"):
        return ref.startswith(pattern[:-1])
    return ref == pattern


def ref_ops(policy: Sequence[tuple[str, Sequence[str]]], ref: str) -> Sequence[str]:
    """The ops of the first rule matching `ref` (first match wins); none when no rule matches."""
    for pattern, ops in policy:
        if ref_matches(pattern, ref):
            return ops
    return ()


def ref_policy_json(policy: Sequence[tuple[str, Sequence[str]]]) -> list[list[object]]:
    """The claim's JSON shape: [[pattern, [ops]], ...]."""
    return [[p, list(ops)] for p, ops in policy]


# -- token requests ------------------------------------------------------------------------


class TokenRequest(
    record(
        "TokenRequest",
        ["repo", "scopes", "ephemeral", "ttl", "refs", "purpose", "narrow"],
        defaults=(False, None, (), "cli", False),
    )
):
    """What a helper asks for: one repository, in one namespace, with these scopes.

    The one request type: the credential helper, the remote helper and the CLI build
    it, token sources (local key, agent client) serve it, the agent's wire format
    carries it and its policy clamps it.
    """

    __slots__ = ()
    repo: str  # a repository id, or "org" for org-wide (org:read) tokens
    scopes: tuple[str, ...]
    ephemeral: bool
    ttl: int | None  # None: the configured (or grant's) default
    # [pattern, [ops]] rules for the `refs` claim (Code Storage enforces them on push).
    refs: Sequence[tuple[str, Sequence[str]]]
    # Which program asks, for the audit log: "credential", "remote", "cli".
    purpose: str
    # Ask for *at most* these scopes: the agent keeps those the caller may have (a grant's
    # terms, or the owner's configuration: config.Config.narrow), each with what it
    # implies (git:write includes read); none left is a refusal. Helpers ask so when the
    # environment names the agent (discovery.agent_named): the credential helper, which
    # cannot tell a fetch from a push, for read+write; the remote helper for what the
    # operation needs.
    narrow: bool

    def checked(self, error: Callable[[str], Exception] = ConfigError) -> TokenRequest:
        """This request validated (repository id, scopes, TTL, refs), with refs normalised."""
        if not isinstance(self.repo, str):
            raise error("a token request names a repository id")
        if self.repo != "org":  # org:read tokens are org-wide and name no repository
            try:
                validate_repo_id(self.repo)
            except ConfigError as e:
                raise error(str(e)) from None
        if not self.scopes or not all(isinstance(s, str) for s in self.scopes):
            raise error("a token request needs scopes: a non-empty list")
        unknown = [s for s in self.scopes if s not in SCOPES]
        if unknown:
            raise error(f"unknown scope {unknown[0][:40]!r}; known: {' '.join(SCOPES)}")
        if self.ttl is not None:
            check_ttl(self.ttl, "ttl", error)
        return self._replace(
            scopes=tuple(dict.fromkeys(self.scopes)),
            refs=ref_policy(list(self.refs), error),
            purpose=str(self.purpose)[:20],
        )


# -- branch names --------------------------------------------------------------------------

MAX_BRANCH = 200
_BRANCH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/")


def validate_branch(name: str, what: str = "branch") -> str:
    """The one branch-name check (the dev server's and the CLI's); rejected, never normalised.

    A short name (`feat/x`, not `refs/heads/feat/x`) that `git check-ref-format --branch`
    accepts, in a portable alphabet: 1..200 ASCII letters, digits and `._-/`; not `HEAD`,
    not starting with `-` (never an option) or `refs/`; no `..`, no trailing `.`; `/`-separated
    components, none empty, starting with `.` or ending in `.lock`.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_BRANCH
        and _BRANCH_CHARS.issuperset(name)
        and name != "HEAD"
        and not name.startswith(("-", "refs/"))
        and ".." not in name
        and not name.endswith(".")
        and all(part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/"))
    )
    if not ok:
        shown = repr(name[:MAX_BRANCH + 1]) if isinstance(name, str) else type(name).__name__
        raise ConfigError(
            f"{what} {shown} is not a branch name: give the short name, e.g. feat (letters, digits, '.', '_', '-', '/'; "
            "not starting with '-' or refs/; no '..'; no component empty, starting with '.' or ending in .lock)"
        )
    return name
