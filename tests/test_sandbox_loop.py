"""The sandbox loop end to end: push to +ephemeral, review, promote exactly what was reviewed.

Real git, both helpers' real entry points, the agent and the dev server. The owner holds
the key and runs the agent; the sandbox holds only an ephemeral-only grant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ORG, DevServer, OrgKey, git, new_repo, run_cli
from tests.test_agent import Agent, sandbox_env, start_agent

REPO = "team/app"
URL = f"codestore://{ORG}/{REPO}"
EPHEMERAL_URL = f"{URL}+ephemeral"


class World:
    def __init__(self, server: DevServer, agent: Agent, grant: dict[str, object], owner: dict[str, str], sandbox: Path, sandbox_env: dict[str, str]) -> None:
        self.server, self.agent, self.grant, self.owner = server, agent, grant, owner
        self.sandbox, self.sandbox_env = sandbox, sandbox_env

    def sandbox_commit_and_push(self, name: str) -> str:
        (self.sandbox / name).write_text(f"{name}\n")
        git("add", name, cwd=self.sandbox, env=self.sandbox_env)
        git("commit", "-qm", f"add {name}", cwd=self.sandbox, env=self.sandbox_env)
        git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=self.sandbox, env=self.sandbox_env)
        return git("rev-parse", "HEAD", cwd=self.sandbox).stdout.strip()

    def codestore(self, *args: str):
        return run_cli("codestore", *args, env=self.owner)

    def default_refs(self) -> dict[str, str]:
        out = git("ls-remote", URL, env=self.owner).stdout
        return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines())}


@pytest.fixture
def world(tmp_path: Path, dev_server: DevServer, org_key: OrgKey) -> Iterator[World]:
    owner = dict(os.environ, CODESTORE_SCOPES="git:read git:write")
    dev_server.create_repo(REPO)
    seed = tmp_path / "seed"
    new_repo(seed, "README", "hello\n", "seed")
    git("push", "-q", URL, "main", cwd=seed, env=owner)
    git("push", "-q", EPHEMERAL_URL, "main", cwd=seed, env=owner)
    agent = start_agent(tmp_path)
    try:
        grant = agent.grant("--repo", REPO, "--scopes", "git:read git:write", "--ephemeral-only", "--sub", "sandbox-42")
        env = sandbox_env(grant["grant"], url=agent.url)
        sandbox = tmp_path / "sandbox"
        git("clone", "-q", EPHEMERAL_URL, str(sandbox), env=env)
        yield World(dev_server, agent, grant, owner, sandbox, env)
    finally:
        agent.stop()


def test_push_review_push_again_promote_old_refused_new_accepted_all_audited(world: World) -> None:
    main_before = world.default_refs()["refs/heads/main"]
    first = world.sandbox_commit_and_push("one.txt")

    reviewed = world.codestore("review", REPO, "feat", "--json")
    assert reviewed.returncode == 0, reviewed.stderr
    r = json.loads(reviewed.stdout)
    assert r["sha"] == first and r["base"] == "main" and r["base_sha"] == main_before
    assert [c["subject"] for c in r["commits"]] == ["add one.txt"]
    assert r["files"] == [{"path": "one.txt", "added": 1, "deleted": 0, "old_mode": "000000", "new_mode": "100644", "kind": "file"}]
    assert r["explained"] is True
    [push] = r["pushes"]
    assert (push["grant"], push["sub"], push["new"], push["result"]) == (world.grant["id"], "sandbox-42", first, "ok")
    assert r["promote"] == f"codestore promote {REPO} feat --expect-sha {first}"

    second = world.sandbox_commit_and_push("two.txt")  # after the review

    refused = world.codestore("promote", REPO, "feat", "--expect-sha", first)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "moved" in refused.stderr and f"review again: codestore review {REPO} feat" in refused.stderr
    assert "refs/heads/feat" not in world.default_refs()

    again = json.loads(world.codestore("review", REPO, "feat", "--json").stdout)
    assert again["sha"] == second
    assert [c["subject"] for c in again["commits"]] == ["add two.txt", "add one.txt"]
    assert [p["new"] for p in again["pushes"]] == [first, second]

    promoted = world.codestore("promote", REPO, "feat", "--expect-sha", second)
    assert promoted.returncode == 0, promoted.stderr
    assert f"at {second}" in promoted.stdout
    assert world.default_refs()["refs/heads/feat"] == second
    assert world.default_refs()["refs/heads/main"] == main_before

    trail = world.codestore("audit", "--repo", REPO, "--json")
    assert trail.returncode == 0, trail.stderr
    entries = [json.loads(line) for line in trail.stdout.splitlines()]
    sandbox_pushes = [e for e in entries if e["event"] == "push" and e["grant"] == world.grant["id"]]
    assert [(e["sub"], e["ephemeral"], e["refs"][0]["new"]) for e in sandbox_pushes] == [
        ("sandbox-42", True, first), ("sandbox-42", True, second),
    ]
    promotions = [e for e in entries if e["event"] == "promote"]
    assert [(e["expect_sha"], e["result"], e["target"]) for e in promotions] == [(first, "error", "feat"), (second, "ok", "feat")]
    assert "moved" in promotions[0]["refs"][0]["reason"]
    assert promotions[1]["grant"] is None and promotions[1]["refs"][0]["new"] == second
    # The promotion's own push went through codestore:// too, so it is in the trail as well.
    owner_push = [e for e in entries if e["event"] == "push" and not e["ephemeral"] and e["refs"][0]["ref"] == "refs/heads/feat"]
    assert owner_push and owner_push[-1]["refs"][0]["new"] == second and owner_push[-1]["grant"] is None

    human = world.codestore("audit", "--repo", REPO, "--event", "promote")
    assert human.returncode == 0 and len(human.stdout.splitlines()) == 2
    assert f"grant {world.grant['id']} (sandbox-42)" in world.codestore("audit", "--grant", str(world.grant["id"])).stdout
    assert world.codestore("audit", "--sub", "sandbox-42", "--event", "push", "--json").stdout.count("\n") == 2


def test_a_sandbox_push_racing_the_promotion_cannot_slip_its_commit_in(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Threat: the sandbox pushes between the owner's check of the branch and the promotion.
    from git_credential_codestore import config, ephemeral, review

    reviewed = world.sandbox_commit_and_push("one.txt")
    git("fetch", "-q", "origin", cwd=world.sandbox, env=world.sandbox_env)
    real = review.remote_heads
    slipped: list[str] = []

    def check_then_race(cfg, repo, ephemeral_ns, env=None, *refs):
        heads = real(cfg, repo, ephemeral_ns, env, *refs)
        if ephemeral_ns and not slipped:  # the check has read the branch: now the sandbox pushes
            slipped.append(world.sandbox_commit_and_push("sneaky.txt"))
        return heads

    monkeypatch.setattr(review, "remote_heads", check_then_race)
    for k, v in world.owner.items():
        monkeypatch.setenv(k, v)
    done = ephemeral.promote_exact(config.load(), REPO, "feat", reviewed)
    assert slipped and slipped[0] != reviewed
    assert done.sha == reviewed
    assert world.default_refs()["refs/heads/feat"] == reviewed


def test_human_review_names_the_sha_the_pushers_and_the_promote_command(world: World) -> None:
    sha = world.sandbox_commit_and_push("one.txt")
    out = world.codestore("review", REPO, "feat")
    assert out.returncode == 0, out.stderr
    assert f"under review: {sha}" in out.stdout
    assert f"grant {world.grant['id']} (sandbox-42)" in out.stdout and "<- under review" in out.stdout
    assert "one.txt | 1 +" in out.stdout
    assert f"codestore promote {REPO} feat --expect-sha {sha}" in out.stdout


def test_what_the_sandbox_wrote_reaches_the_reviewers_terminal_escaped(world: World) -> None:
    # Threat: a sandbox's commit subject, author name or branch name carrying terminal
    # escapes (OSC 52 writes the reviewer's clipboard; CSI draws fake lines, such as a
    # forged "<- under review") into `codestore review` and `branch list`.
    evil = "\x1b]52;c;ZWNobyBwd25lZAo=\x07\x1b[2K\u202e"
    (world.sandbox / "e.txt").write_text("e\n")
    git("add", "e.txt", cwd=world.sandbox, env=world.sandbox_env)
    git("commit", "-qm", f"subject{evil}", cwd=world.sandbox, env=dict(world.sandbox_env, GIT_AUTHOR_NAME=f"Mallory{evil}"))
    git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=world.sandbox, env=world.sandbox_env)
    for out in (world.codestore("review", REPO, "feat"), world.codestore("branch", "list", REPO)):
        assert out.returncode == 0, out.stderr
        assert not any(c in out.stdout for c in "\x1b\x07\u202e"), out.stdout
    review = world.codestore("review", REPO, "feat").stdout
    assert "subject\\x1b]52;c;" in review and "Mallory\\x1b" in review


def test_review_shows_exactly_the_commits_pushed_and_the_modes_a_line_count_hides(world: World) -> None:
    # Threats, from what a sandbox writes: a subject holding git log's field and record
    # separators (0x1f, 0x1e) made `codestore review` list a commit nobody pushed ("0123...
    # REVIEWED-BY-SECURITY", by Linus Torvalds), in the text and in --json; and an exec bit,
    # a symlink out of the tree and a submodule showed as "| 0" and "| 1 +".
    forged = "docs: typo\x1e0123456789abcdef0123456789abcdef01234567\x1fLinus Torvalds\x1ft@l.org\x1f2020-01-01\x1fREVIEWED"
    (world.sandbox / "README").chmod(0o755)
    (world.sandbox / "key.pem").symlink_to("/home/user/.ssh/id_rsa")
    # A path that looks like a --raw record's head, with a tab and a newline, and a binary file:
    # the raw and numstat records of one `git diff` are told apart by position, not content.
    odd = ":100644 100755 a\tb\nc"
    (world.sandbox / odd).write_text("one\ntwo\n")
    (world.sandbox / "blob.bin").write_bytes(b"\0\1\2")
    git("add", "README", "key.pem", "./" + odd, "blob.bin", cwd=world.sandbox, env=world.sandbox_env)
    git("update-index", "--add", "--cacheinfo", "160000," + "a" * 40 + ",vendor/lib", cwd=world.sandbox, env=world.sandbox_env)
    git("commit", "-qm", forged, cwd=world.sandbox, env=world.sandbox_env)
    git("push", "-q", "origin", "HEAD:refs/heads/feat", cwd=world.sandbox, env=world.sandbox_env)
    r = json.loads(world.codestore("review", REPO, "feat", "--json").stdout)
    assert [c["sha"] for c in r["commits"]] == [git("rev-parse", "HEAD", cwd=world.sandbox).stdout.strip()]
    assert r["commits"][0]["subject"] == forged
    kinds = {f["path"]: (f["kind"], f["old_mode"], f["new_mode"]) for f in r["files"]}
    assert kinds == {"README": ("executable", "100644", "100755"), "key.pem": ("symlink", "000000", "120000"),
                     "vendor/lib": ("submodule", "000000", "160000"), odd: ("file", "000000", "100644"),
                     "blob.bin": ("file", "000000", "100644")}
    lines = {f["path"]: (f["added"], f["deleted"]) for f in r["files"]}
    assert lines[odd] == (2, 0) and lines["blob.bin"] == (None, None) and lines["README"] == (0, 0)
    assert next(f for f in r["files"] if f["path"] == "key.pem")["link_target"] == "/home/user/.ssh/id_rsa"
    text = world.codestore("review", REPO, "feat").stdout
    assert "Commits (1):" in text and "mode change 100644 => 100755 README" in text
    assert "key.pem: symlink (new, 120000) -> /home/user/.ssh/id_rsa" in text and "vendor/lib: submodule" in text


def test_a_promotion_the_target_refuses_says_git_refused_it_and_what_to_do(world: World, tmp_path: Path) -> None:
    # The reason was git's first line holding "codestore:": its "To codestore://acme/..." line,
    # naming only the remote, in the error and in the audit trail; the hint never showed.
    sha = world.sandbox_commit_and_push("one.txt")
    other = tmp_path / "other"
    git("clone", "-q", URL, str(other), env=world.owner)
    (other / "b").write_text("b\n")
    git("add", "b", cwd=other)
    git("commit", "-qm", "b", cwd=other)
    git("push", "-q", URL, "HEAD:refs/heads/feat", cwd=other, env=world.owner)  # the target, feat in the default namespace, moved
    out = world.codestore("promote", REPO, "feat", "--expect-sha", sha)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "! [rejected]" in out.stderr and "the target moved on: review against it again" in out.stderr, out.stderr
    assert "To codestore://" not in out.stderr


def test_a_branch_named_under_one_reviewed_before_can_be_reviewed(world: World) -> None:
    # The review cache kept refs/codestore/ephemeral/x after x was reviewed; x/y could then
    # never be reviewed ("git remote prune ...", for a remote that does not exist).
    world.sandbox_commit_and_push("one.txt")
    git("push", "-q", "origin", "HEAD:refs/heads/x", cwd=world.sandbox, env=world.sandbox_env)
    assert world.codestore("review", REPO, "x").returncode == 0
    git("push", "-q", "origin", ":refs/heads/x", cwd=world.sandbox, env=world.sandbox_env)
    git("push", "-q", "origin", "HEAD:refs/heads/x/y", cwd=world.sandbox, env=world.sandbox_env)
    out = world.codestore("review", REPO, "x/y")
    assert out.returncode == 0 and "under review:" in out.stdout, out.stderr
    git("push", "-q", "origin", ":refs/heads/x/y", cwd=world.sandbox, env=world.sandbox_env)
    git("push", "-q", "origin", "HEAD:refs/heads/x", cwd=world.sandbox, env=world.sandbox_env)
    assert world.codestore("review", REPO, "x").returncode == 0  # and back


def test_a_head_no_audited_push_explains_is_flagged(world: World, tmp_path: Path) -> None:
    # Threat: a sandbox pushes around the remote helper (a token used by hand) to dodge the trail.
    elsewhere = tmp_path / "elsewhere"
    git("clone", "-q", EPHEMERAL_URL, str(elsewhere), env=world.owner)
    (elsewhere / "x").write_text("x\n")
    git("add", "x", cwd=elsewhere)
    git("commit", "-qm", "unreported", cwd=elsewhere)
    git("push", "-q", f"{world.server.url}/{REPO}+ephemeral.git", "HEAD:refs/heads/feat", cwd=elsewhere,
        env=dict(world.owner, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="credential.helper", GIT_CONFIG_VALUE_0="codestore",
                 GIT_CONFIG_PARAMETERS="'credential.useHttpPath'='true'"))
    r = json.loads(world.codestore("review", REPO, "feat", "--json").stdout)
    assert r["explained"] is False and r["pushes"] == []
    assert "no audited push put" in world.codestore("review", REPO, "feat").stdout


REFUSALS = [
    (("review", REPO, "nope"), "there is no branch 'nope' in team/app+ephemeral"),
    (("review", REPO, "feat", "--base", "nope"), "there is no branch 'nope' in team/app to review against"),
    (("review", "../x", "feat"), "is not a repository id"),
    (("review", REPO, "refs/heads/feat"), "give the short name"),
    (("promote", REPO, "feat", "--expect-sha", "abc123"), "--expect-sha takes the full commit id"),
    (("promote", REPO, "nope", "--expect-sha", "a" * 40), "there is no branch 'nope'"),
    (("promote", REPO, "feat", "--expect-sha", "a" * 40, "--to", "a.lock/b"), "'a.lock/b' is not a branch name"),
    (("audit", "--since", "yesterday"), "--since takes a UTC time"),
    (("audit", "--ref", "feat..main"), "--ref takes a ref name"),
    (("repo", "delete", REPO), "cannot be undone; confirm with: codestore repo delete team/app --yes"),
    (("branch", "list", "../x"), "is not a repository id"),
    (("branch", "delete", REPO, "refs/heads/feat", "--ephemeral"), "give the short name"),
]


def test_refusals_of_review_promote_audit_and_delete_are_one_clear_line(world: World) -> None:
    # One world for the whole table: each case is a separate command, and they change nothing.
    world.sandbox_commit_and_push("one.txt")
    for args, message in REFUSALS:
        proc = world.codestore(*args)
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("codestore: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert world.default_refs().keys() == {"HEAD", "refs/heads/main"}
