"""The dev server's repositories on disk: `DATA/repos/<id>.git`, bare, one per id.

`team/app` lives at `repos/team/app.git`. The `+ephemeral` namespace is not a second
repository: it is `refs/namespaces/ephemeral/` inside the same one, so objects are
shared and refs never overlap. Every git command here runs with the server's own git
environment (no system or user configuration) and argument lists only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypedDict

from .. import git, jsontext
from ..errors import ConfigError, GitError, Refused
from ..vocab import SUFFIXES, validate_branch, validate_repo_id

EPHEMERAL_NS = "ephemeral"
EPHEMERAL_PREFIX = f"refs/namespaces/{EPHEMERAL_NS}/"
# `{repo}+import.git` (the SDK's `get_import_remote_url`): a second namespace inside the
# same repository, served exactly like `+ephemeral` (same token, shared objects, refs of
# its own). Code Storage does not document it beyond "points to import namespace".
NAMESPACES = tuple(suffix[1:] for suffix in SUFFIXES)  # ("ephemeral", "import")
META_FILE = "codestore.json"
_SHA = re.compile(r"^[0-9a-f]{4,64}$")  # a full or abbreviated commit id


def check_branch(name: str, what: str) -> str:
    """vocab's one branch rule, refused as a 400 naming the field."""
    try:
        return validate_branch(name, what)
    except ConfigError as e:
        raise Refused(400, str(e)) from None


class Commit(TypedDict):
    """One commit as Code Storage lists it."""

    sha: str
    parent_shas: list[str]
    message: str
    author_name: str
    author_email: str
    committer_name: str
    committer_email: str
    date: str


class SignedCommit(Commit, total=False):
    """A commit with its signature and the payload it signs, when it is signed."""

    signature: str
    payload: str


class FileDiff(TypedDict):
    """One file's change in a diff, as Code Storage answers it."""

    path: str
    state: str
    old_path: str | None
    raw: str
    bytes: int
    is_eof: bool
    additions: int
    deletions: int


@dataclass(frozen=True)
class RepoInfo:
    repo_id: str
    default_branch: str
    created_at: str


class RepoStore:
    def __init__(self, root: str, env: Mapping[str, str]) -> None:
        self.root = root
        # A `path` a client gives is a path, not a pathspec: ":(bogus)x" was git's fatal error
        # (a 500), ":(exclude)x" and "*" changed what was listed.
        self.env = {**env, "GIT_LITERAL_PATHSPECS": "1"}
        os.makedirs(root, exist_ok=True)

    def path(self, repo: str) -> str:
        return os.path.join(self.root, *validate_repo_id(repo).split("/")) + ".git"

    def exists(self, repo: str) -> bool:
        p = self.path(repo)
        return os.path.isfile(os.path.join(p, "HEAD")) and os.path.isdir(os.path.join(p, "objects"))

    def _git(self, repo: str, *args: str, ok: tuple[int, ...] = (0,)) -> str:
        return git.run(["--git-dir", self.path(repo), *args], env=self.env, ok=ok).stdout

    def create(self, repo: str, default_branch: str, source: str | None = None, start: str | None = None) -> RepoInfo:
        """`git init --bare` into a temporary directory, then rename: creation is atomic.

        With `source` (a fork), its branches and tags are copied in before the rename, and
        `start` (a commit of the source) becomes the default branch's head.
        """
        check_branch(default_branch, "default_branch")
        final = self.path(repo)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(final):
            raise Refused(409, f"repository {repo!r} already exists")
        tmp = tempfile.mkdtemp(prefix=".creating-", dir=parent)
        try:
            git.run(["init", "--quiet", "--bare", f"--initial-branch={default_branch}", tmp], env=self.env)
            # Clones of `repo+ephemeral.git` (and `+import`) check out the same default branch.
            for ns in NAMESPACES:
                prefix = f"refs/namespaces/{ns}/"
                git.run(["--git-dir", tmp, "symbolic-ref", f"{prefix}HEAD", f"{prefix}refs/heads/{default_branch}"], env=self.env)
            if source is not None:
                git.run(
                    ["--git-dir", tmp, "fetch", "--quiet", "--no-tags", self.path(source),
                     "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                    env=self.env,
                )
                if start is not None:
                    git.run(["--git-dir", tmp, "update-ref", f"refs/heads/{default_branch}", start], env=self.env)
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump({"repo_id": repo, "created_at": created}, f)
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone created it between our check and the rename.
                raise Refused(409, f"repository {repo!r} already exists") from None
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return RepoInfo(repo, default_branch, created)

    def info(self, repo: str) -> RepoInfo:
        p = self.path(repo)
        try:
            with open(os.path.join(p, META_FILE), encoding="utf-8") as f:
                created = str(jsontext.loads(f.read()).get("created_at", ""))
        except (OSError, ValueError):
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(p).st_mtime))
        try:
            with open(os.path.join(p, "HEAD"), encoding="utf-8") as f:
                head = f.read().strip()
        except OSError:
            head = ""
        branch = head[len("ref: refs/heads/") :] if head.startswith("ref: refs/heads/") else "main"
        return RepoInfo(repo, branch, created)

    def all(self) -> Iterator[str]:
        """Every repository id, sorted; never descends into a repository."""
        found = []
        for dirpath, dirnames, _ in os.walk(self.root):
            keep = []
            for d in dirnames:
                if d.startswith("."):
                    continue
                if d.endswith(".git"):
                    rel = os.path.relpath(os.path.join(dirpath, d), self.root)[:-4]
                    repo = rel.replace(os.sep, "/")
                    if self.exists(repo):
                        found.append(repo)
                else:
                    keep.append(d)
            dirnames[:] = keep
        return iter(sorted(found))

    def resolve(self, repo: str, ref: str, ephemeral: bool) -> str | None:
        """A branch, then a tag, then a (possibly abbreviated) commit id, in the chosen namespace."""
        prefix = EPHEMERAL_PREFIX if ephemeral else ""
        candidates = [f"{prefix}refs/heads/{ref}", f"{prefix}refs/tags/{ref}"]
        if ref.startswith("refs/"):
            candidates.insert(0, prefix + ref)
        for name in candidates:
            out = self._git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", ok=(0, 1))
            if out.strip():
                return out.strip()
        if _SHA.match(ref):
            out = self._git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", ok=(0, 1))
            return out.strip() or None
        return None

    def create_branch(self, repo: str, target: str, sha: str, ephemeral: bool) -> bool:
        """Create `target` at `sha`; False when it already exists (at any commit)."""
        ref = f"{EPHEMERAL_PREFIX if ephemeral else ''}refs/heads/{target}"
        try:
            # An all-zero old value makes update-ref refuse when the ref exists: atomic create.
            self._git(repo, "update-ref", "-m", "codestore: branches/create", ref, sha, "0" * len(sha))
        except GitError:
            return False
        return True

    def branch_sha(self, repo: str, target: str, ephemeral: bool) -> str | None:
        ref = f"{EPHEMERAL_PREFIX if ephemeral else ''}refs/heads/{target}"
        out = self._git(repo, "rev-parse", "--verify", "--quiet", ref, ok=(0, 1))
        return out.strip() or None

    # ---- what the REST endpoints read and change ------------------------------------------

    def delete(self, repo: str) -> None:
        """Rename out of the way, then remove: no request ever sees half a repository."""
        if not self.exists(repo):
            raise Refused(404, f"repository {repo!r} does not exist")
        final = self.path(repo)
        doomed = tempfile.mkdtemp(prefix=".deleting-", dir=self.root)
        try:
            os.rename(final, os.path.join(doomed, "repo.git"))
        except OSError:
            os.rmdir(doomed)
            raise Refused(404, f"repository {repo!r} does not exist") from None
        shutil.rmtree(doomed, ignore_errors=True)

    def branches(self, repo: str, ephemeral: bool) -> list[tuple[str, str, int]]:
        """(name, head sha, head commit time) of every branch in one namespace, by name."""
        prefix = f"{EPHEMERAL_PREFIX if ephemeral else ''}refs/heads/"
        out = self._git(repo, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(committerdate:unix)", prefix)
        rows = []
        for line in out.splitlines():
            ref, sha, when = line.split("\0")
            rows.append((ref[len(prefix) :], sha, int(when or 0)))
        return sorted(rows)

    def delete_branch(self, repo: str, name: str, ephemeral: bool, expect: str) -> bool:
        """Delete `name` if it is still at `expect`; False when it moved or is gone."""
        ref = f"{EPHEMERAL_PREFIX if ephemeral else ''}refs/heads/{name}"
        try:
            self._git(repo, "update-ref", "-d", ref, expect)
        except GitError:
            return False
        return True

    def move_branch(self, repo: str, target: str, sha: str, ephemeral: bool, expect: str) -> bool:
        """Move an existing branch from `expect` to `sha`; False when it moved meanwhile."""
        ref = f"{EPHEMERAL_PREFIX if ephemeral else ''}refs/heads/{target}"
        try:
            self._git(repo, "update-ref", "-m", "codestore: branches/create force", ref, sha, expect)
        except GitError:
            return False
        return True

    def is_ancestor(self, repo: str, old: str, new: str) -> bool:
        proc = git.run(["--git-dir", self.path(repo), "merge-base", "--is-ancestor", old, new], env=self.env, ok=(0, 1))
        return proc.returncode == 0

    def merge_base(self, repo: str, a: str, b: str) -> str | None:
        return self._git(repo, "merge-base", a, b, ok=(0, 1)).strip() or None

    def log(self, repo: str, sha: str, skip: int, count: int, path: str | None, walk: bool = True) -> list[Commit]:
        """Commits reachable from `sha`, newest first, as Code Storage lists them."""
        # NUL-separated (git.log_records): a message holding 0x1e, the separator before, was a 500.
        args = ["--git-dir", self.path(repo), "log", f"--skip={skip}", f"--max-count={count}", *([] if walk else ["--no-walk"]), sha, "--"]
        if path:
            args.append(path)
        commits: list[Commit] = []
        for r in git.log_records(args, ["%H", "%P", "%an", "%ae", "%cn", "%ce", "%at", "%B"], env=self.env):
            sha_, parents, an, ae, cn, ce, at, message = (r["%H"], r["%P"], r["%an"], r["%ae"], r["%cn"], r["%ce"], r["%at"], r["%B"])
            commits.append(
                {
                    "sha": sha_,
                    "parent_shas": parents.split(),
                    "message": message.rstrip("\n"),
                    "author_name": an,
                    "author_email": ae,
                    "committer_name": cn,
                    "committer_email": ce,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(at))),
                }
            )
        return commits

    def diff(self, repo: str, base: str, head: str, paths: list[str]) -> list[FileDiff]:
        """Per-file changes from `base` to `head` (rename detection on), with each patch."""
        limit = ["--", *paths] if paths else []
        status = self._git(repo, "diff", "--name-status", "-z", "-M", base, head, *limit).split("\0")
        numstat = self._git(repo, "diff", "--numstat", "-z", "-M", base, head, *limit).split("\0")
        counts: dict[str, tuple[int, int]] = {}
        i = 0
        while i < len(numstat) and numstat[i]:
            added, deleted, name = numstat[i].split("\t", 2)
            if not name:  # a rename: the two names follow as their own fields
                name, i = numstat[i + 2], i + 3
            else:
                i += 1
            counts[name] = (int(added) if added.isdigit() else 0, int(deleted) if deleted.isdigit() else 0)
        files: list[FileDiff] = []
        i = 0
        while i < len(status) and status[i]:
            state = status[i]
            if state[0] in "RC":
                old, new, i = status[i + 1], status[i + 2], i + 3
            else:
                old, new, i = None, status[i + 1], i + 2
            patch = git.output(["--git-dir", self.path(repo), "diff", "-M", base, head, "--", *([old] if old else []), new], env=self.env)
            raw = patch.decode("utf-8", "replace")
            additions, deletions = counts.get(new, (0, 0))
            files.append(
                {
                    "path": new,
                    "state": state,
                    "old_path": old,
                    "raw": raw,
                    "bytes": len(patch),
                    "is_eof": True,
                    "additions": additions,
                    "deletions": deletions,
                }
            )
        return files

    def tags(self, repo: str) -> list[tuple[str, str]]:
        """(name, the commit it points at) of every tag, by name; annotated tags peeled."""
        fmt = "%(refname:strip=2)%00%(objectname)%00%(*objectname)"
        rows = []
        for line in self._git(repo, "for-each-ref", f"--format={fmt}", "refs/tags/").splitlines():
            name, obj, peeled = line.split("\0")
            rows.append((name, peeled or obj))
        return sorted(rows)

    def commit(self, repo: str, sha: str) -> SignedCommit:
        """One commit as Code Storage describes it; `signature`/`payload` when it is signed."""
        (commit,) = self.log(repo, sha, 0, 1, None, walk=False)
        info: SignedCommit = {**commit}
        raw = git.output(["--git-dir", self.path(repo), "cat-file", "commit", sha], env=self.env)
        header, sep, message = raw.partition(b"\n\n")
        kept, signature, in_sig = [], [], False
        for line in header.split(b"\n"):
            if line.startswith((b"gpgsig ", b"gpgsig-sha256 ")):
                in_sig = True
                signature.append(line.split(b" ", 1)[1])
            elif in_sig and line.startswith(b" "):
                signature.append(line[1:])
            else:
                in_sig = False
                kept.append(line)
        if signature:
            info["signature"] = b"\n".join(signature).decode("utf-8", "replace") + "\n"
            info["payload"] = (b"\n".join(kept) + sep + message).decode("utf-8", "replace")
        return info

    def tree(self, repo: str, sha: str, path: str | None, recursive: bool) -> list[tuple[str, str, str]]:
        """(path, type, mode) under `path` at `sha`: blob, tree, symlink or submodule."""
        args = ["ls-tree", "-z", *(["-r", "-t"] if recursive else []), sha]
        if path:
            args += ["--", path.rstrip("/") + "/"]
        out = []
        for line in self._git(repo, *args).split("\0"):
            if not line:
                continue
            meta, name = line.split("\t", 1)
            mode, kind, _ = meta.split(" ", 2)
            kind = {"commit": "submodule"}.get(kind, kind)
            if mode == "120000":
                kind = "symlink"
            out.append((name, kind, mode))
        return out

    def read_blob(self, repo: str, sha: str, path: str) -> tuple[str, bytes, str] | None:
        """(blob sha, content, last commit touching it) of `path` at commit `sha`; None if absent."""
        proc = git.run(["--git-dir", self.path(repo), "rev-parse", "--verify", "--quiet", f"{sha}:{path}"], env=self.env, ok=(0, 1, 128))
        blob = proc.stdout.strip()
        if proc.returncode != 0 or not blob:
            return None
        if self._git(repo, "cat-file", "-t", blob).strip() != "blob":
            return None
        data = git.output(["--git-dir", self.path(repo), "cat-file", "blob", blob], env=self.env)
        last = self._git(repo, "log", "-1", "--format=%H", sha, "--", path).strip()
        return blob, data, last
