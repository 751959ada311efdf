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

from .. import git
from ..errors import GitError, Refused
from ..vocab import validate_repo_id

EPHEMERAL_NS = "ephemeral"
EPHEMERAL_PREFIX = f"refs/namespaces/{EPHEMERAL_NS}/"
META_FILE = "codestore.json"
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHA = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def check_branch(name: str, what: str) -> str:
    if (
        not isinstance(name, str)
        or not _BRANCH.match(name)
        or ".." in name
        or "//" in name
        or name.endswith(("/", ".", ".lock"))
        or "/." in name
        or "@{" in name
    ):
        raise Refused(400, f"{what} {str(name)[:100]!r} is not a valid branch name")
    return name


@dataclass(frozen=True)
class RepoInfo:
    repo_id: str
    default_branch: str
    created_at: str


class RepoStore:
    def __init__(self, root: str, env: Mapping[str, str]) -> None:
        self.root = root
        self.env = dict(env)
        os.makedirs(root, exist_ok=True)

    def path(self, repo: str) -> str:
        return os.path.join(self.root, *validate_repo_id(repo).split("/")) + ".git"

    def exists(self, repo: str) -> bool:
        p = self.path(repo)
        return os.path.isfile(os.path.join(p, "HEAD")) and os.path.isdir(os.path.join(p, "objects"))

    def _git(self, repo: str, *args: str, ok: tuple[int, ...] = (0,)) -> str:
        return git.run(["--git-dir", self.path(repo), *args], env=self.env, ok=ok).stdout

    def create(self, repo: str, default_branch: str) -> RepoInfo:
        """`git init --bare` into a temporary directory, then rename: creation is atomic."""
        check_branch(default_branch, "default_branch")
        final = self.path(repo)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(final):
            raise Refused(409, f"repository {repo!r} already exists")
        tmp = tempfile.mkdtemp(prefix=".creating-", dir=parent)
        try:
            git.run(["init", "--quiet", "--bare", f"--initial-branch={default_branch}", tmp], env=self.env)
            # Clones of `repo+ephemeral.git` check out the same default branch.
            git.run(
                ["--git-dir", tmp, "symbolic-ref", f"{EPHEMERAL_PREFIX}HEAD", f"{EPHEMERAL_PREFIX}refs/heads/{default_branch}"],
                env=self.env,
            )
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
                created = str(json.load(f).get("created_at", ""))
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
        """A branch, then a tag, then a full commit id, in the chosen namespace."""
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
