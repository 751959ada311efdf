"""`codestore review`: what a sandbox pushed to `+ephemeral`, against its base.

Everything here is real git through `codestore://`, so it works the same against Code
Storage and the dev server: the branch head is read with `git ls-remote`, both sides
are fetched into a bare cache repository (<user cache dir>/codestore/review/<org>/<repo>.git,
incremental, objects only), and commits and diffstat come from `git log`/`git diff`
there. Who pushed each update comes from the audit trail (audit.py); a head that no
audited push explains is flagged, since the trail is what the pushers' helpers
reported, while the SHA under review is what the server holds.

The SHA under review is the one `codestore promote --expect-sha` then pushes, and
nothing else (ephemeral.promote_exact).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import git, remotes
from .config import Config
from .errors import GitError, RemoteError
from .vocab import validate_branch, validate_repo_id

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
def remote_url(cfg: Config, repo: str, ephemeral: bool) -> str:
    return f"{remotes.SCHEME}{cfg.require_org()}/{repo}{'+ephemeral' if ephemeral else ''}"


def _git(args: list[str], env: Mapping[str, str] | None, ok: tuple[int, ...] = (0,)) -> str:
    return git.run(args, env=env, ok=ok).stdout


def remote_heads(cfg: Config, repo: str, ephemeral: bool, env: Mapping[str, str] | None = None,
                 *refs: str) -> dict[str, str]:
    """`git ls-remote` of one namespace: {ref: sha}, plus "HEAD->" naming HEAD's branch."""
    out = _git(["ls-remote", "--symref", remote_url(cfg, repo, ephemeral), *refs], env)
    heads: dict[str, str] = {}
    for line in out.splitlines():
        left, _, ref = line.partition("\t")
        if left.startswith("ref: "):
            heads["HEAD->"] = left[len("ref: "):]
        elif ref:
            heads[ref] = left
    return heads


def cache_repo(cfg: Config, repo: str, env: Mapping[str, str] | None = None) -> str:
    """The bare repository reviews fetch into, created on first use."""
    validate_repo_id(repo)
    from platformdirs import user_cache_dir

    path = os.path.join(user_cache_dir("codestore"), "review", cfg.require_org(), repo + ".git")
    if not os.path.isdir(os.path.join(path, "objects")):
        os.makedirs(path, mode=0o700, exist_ok=True)
        _git(["init", "-q", "--bare", path], env)
    return path


def fetch(cache: str, cfg: Config, repo: str, ephemeral: bool, branch: str, env: Mapping[str, str] | None = None) -> str:
    """Fetch one branch into the cache under refs/codestore/<namespace>/; returns its SHA."""
    ns = "ephemeral" if ephemeral else "default"
    local = f"refs/codestore/{ns}/{branch}"
    # A branch reviewed before whose name is a directory of this one's (x, for x/y), or the
    # other way round, left a cache ref git cannot have beside it: the fetch failed, naming a
    # `git remote prune` for a remote that does not exist. Those cache refs go (the cache
    # keeps heads fetched for reviews; the objects stay).
    prefixes = {f"refs/codestore/{ns}/{'/'.join(branch.split('/')[:i])}" for i in range(1, branch.count("/") + 1)}
    cached = _git(["-C", cache, "for-each-ref", "--format=%(refname)", f"refs/codestore/{ns}/"], env).splitlines()
    conflicting = [ref for ref in cached if ref in prefixes or ref.startswith(local + "/")]
    if conflicting:
        git.run(["-C", cache, "update-ref", "--stdin"], env=env, input="".join(f"delete {ref}\n" for ref in conflicting))
    _git(["-C", cache, "fetch", "-q", "--no-tags", "--no-write-fetch-head", remote_url(cfg, repo, ephemeral),
          f"+refs/heads/{branch}:{local}"], env)
    return _git(["-C", cache, "rev-parse", "--verify", local], env).strip()


def has_commit(cache: str, sha: str, env: Mapping[str, str] | None = None) -> bool:
    return git.run(["-C", cache, "cat-file", "-e", f"{sha}^{{commit}}"], env=env, ok=(0, 1, 128)).returncode == 0


@dataclass
class Review:
    repo: str
    branch: str
    sha: str
    base: str | None
    base_sha: str | None
    merge_base: str | None
    commits: list[dict[str, str]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    stat: str = ""
    pushes: list[dict[str, Any]] = field(default_factory=list)
    explained: bool = False

    @property
    def promote_command(self) -> str:
        return f"codestore promote {self.repo} {self.branch} --expect-sha {self.sha}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("stat")
        data["namespace"] = "ephemeral"
        data["totals"] = {
            "commits": len(self.commits),
            "files": len(self.files),
            "added": sum(f["added"] or 0 for f in self.files),
            "deleted": sum(f["deleted"] or 0 for f in self.files),
        }
        data["promote"] = self.promote_command
        return data


def review(cfg: Config, repo: str, branch: str, base: str | None = None, *,
           trail: list[dict[str, Any]] | None = None, env: Mapping[str, str] | None = None) -> Review:
    """Fetch BRANCH of REPO+ephemeral and its base; describe what it adds."""
    from . import audit

    validate_repo_id(repo)
    validate_branch(branch)
    if base is not None:
        validate_branch(base, "base")
    heads = remote_heads(cfg, repo, True, env, f"refs/heads/{branch}")
    if f"refs/heads/{branch}" not in heads:
        raise RemoteError(f"there is no branch {branch!r} in {repo}+ephemeral; see: codestore branch list {repo}")
    defaults = remote_heads(cfg, repo, False, env)
    if base is None:
        # The branch it would be promoted onto, if it exists; else the default branch.
        if f"refs/heads/{branch}" in defaults:
            base = branch
        elif defaults.get("HEAD->", "").startswith("refs/heads/"):
            base = defaults["HEAD->"][len("refs/heads/"):]
    elif f"refs/heads/{base}" not in defaults:
        raise RemoteError(f"there is no branch {base!r} in {repo} to review against; see: codestore branch list {repo}")
    cache = cache_repo(cfg, repo, env)
    sha = fetch(cache, cfg, repo, True, branch, env)
    base_sha = merge_base = None
    if base is not None and f"refs/heads/{base}" in defaults:
        base_sha = fetch(cache, cfg, repo, False, base, env)
        proc = git.run(["-C", cache, "merge-base", base_sha, sha], env=env, ok=(0, 1))
        merge_base = proc.stdout.strip() or None
    result = Review(repo, branch, sha, base, base_sha, merge_base)
    result.commits = _commits(cache, sha, base_sha, env)
    result.files, result.stat = _diff(cache, merge_base or EMPTY_TREE, sha, env)
    entries = trail if trail is not None else []
    result.pushes = audit.pushes_to(entries, repo, f"refs/heads/{branch}", True)
    result.explained = any(p["new"] == sha and p["result"] == "ok" for p in result.pushes)
    return result


def _commits(cache: str, sha: str, base_sha: str | None, env: Mapping[str, str] | None) -> list[dict[str, str]]:
    keys = {"%H": "sha", "%an": "author", "%ae": "email", "%aI": "date", "%s": "subject"}
    args = ["-C", cache, "log", sha]
    if base_sha:
        args += ["--not", base_sha]
    return [{keys[k]: v for k, v in record.items()} for record in git.log_records(args, list(keys), env=env)]


_KINDS = {"100644": "file", "100755": "executable", "120000": "symlink", "160000": "submodule", "040000": "tree"}
LINK_TARGET_MAX = 4096


def _diff(cache: str, old: str, new: str, env: Mapping[str, str] | None) -> tuple[list[dict[str, Any]], str]:
    """Each file changed (its lines, and its mode before and after: an exec bit, a symlink and
    a submodule are what a line count hides), and git's diffstat with its summary of modes."""
    files: list[dict[str, Any]] = []
    modes: dict[str, list[str]] = {}
    # One run for both: --raw's records (":OLDMODE NEWMODE OLDSHA NEWSHA STATUS" NUL path NUL),
    # then --numstat's ("ADDED TAB DELETED TAB path" NUL), each a file, in the same order.
    fields = iter(_git(["-C", cache, "diff", "--no-renames", "--raw", "--numstat", "-z", "--no-abbrev", old, new], env).split("\0"))
    for rec in fields:
        if rec.startswith(":"):
            modes[next(fields, "")] = rec[1:].split(" ")
        elif rec:
            added, deleted, path = rec.split("\t", 2)
            files.append({
                "path": path,
                "added": int(added) if added.isdigit() else None,  # "-" for a binary file
                "deleted": int(deleted) if deleted.isdigit() else None,
            })
    for f in files:
        old_mode, new_mode, _, new_sha, _ = modes.get(f["path"], ["000000", "000000", "", "", ""])
        f["old_mode"], f["new_mode"] = old_mode, new_mode
        f["kind"] = _KINDS.get(new_mode if new_mode != "000000" else old_mode, "other")
        if new_mode == "120000":  # where the link points: what its one line of "diff" is
            target = git.output(["-C", cache, "cat-file", "blob", new_sha], env=env)[:LINK_TARGET_MAX]
            f["link_target"] = target.decode("utf-8", "replace")
    stat = _git(["-C", cache, "diff", "--no-renames", "--stat=100", "--summary", old, new], env)
    return files, stat


def render(r: Review) -> str:
    """The review for a person (the pager shows it)."""
    out = [f"Review of {r.repo}+ephemeral {r.branch}", f"  under review: {r.sha}"]
    if r.base:
        out.append(f"  base:         {r.base} at {r.base_sha} (merge base {r.merge_base or 'none: unrelated histories'})")
    else:
        out.append("  base:         none (the default namespace has no branches)")
    out += ["", f"Commits ({len(r.commits)}):"]
    out += [f"  {c['sha'][:12]} {c['subject']}  ({c['author']} <{c['email']}>, {c['date']})" for c in r.commits] or ["  (none)"]
    out += ["", f"Pushes to {r.branch} in +ephemeral (from the audit trail):"]
    for p in r.pushes:
        who = f"grant {p['grant']} ({p['sub']})" if p.get("grant") else f"{p.get('sub')} ({p.get('via') or 'owner'})"
        mark = "  <- under review" if p["new"] == r.sha and p["result"] == "ok" else ""
        out.append(f"  {p['time']}  {str(p['old'])[:12]} -> {str(p['new'])[:12]}  {p['result']:<7} {who}{mark}")
    if not r.pushes:
        out.append("  (none recorded)")
    if not r.explained:
        out.append(f"  warning: no audited push put {r.sha[:12]} on {r.branch}: it was pushed outside codestore://, "
                   "or the report was lost; judge the commits themselves")
    out += ["", "Diffstat:", r.stat.rstrip("\n") or "  (no changes)"]
    unusual = [f for f in r.files if f.get("kind") in ("symlink", "submodule", "other")
               or f.get("old_mode") not in ("000000", f.get("new_mode")) or f.get("new_mode") == "100755"]
    if unusual:  # what a line count hides: each is worth a look before promotion
        out += ["", "Modes, links and submodules:"]
        for f in unusual:
            change = f"{f['old_mode']} -> {f['new_mode']}" if f["old_mode"] != "000000" else f"new, {f['new_mode']}"
            target = f" -> {f['link_target']}" if "link_target" in f else ""
            out.append(f"  {f['path']}: {f['kind']} ({change}){target}")
    out += ["",
            "Promote exactly this commit, and nothing pushed after it, with:", f"  {r.promote_command}", ""]
    from .errors import for_terminal

    # Commit subjects, authors and paths are the sandbox's: shown, never acted on by the terminal.
    return "\n".join(for_terminal(line) for line in "\n".join(out).split("\n"))


def ensure_commit(cache: str, cfg: Config, repo: str, branch: str, sha: str, env: Mapping[str, str] | None = None) -> None:
    """Have `sha` in the cache (fetching the branch again if needed) or say why not."""
    if has_commit(cache, sha, env):
        return
    try:
        fetch(cache, cfg, repo, True, branch, env)
    except GitError:
        pass
    if not has_commit(cache, sha, env):
        raise RemoteError(f"commit {sha[:12]} is not on {repo}+ephemeral {branch} any more; review again: codestore review {repo} {branch}")
