"""The pre-receive hook that enforces a token's `refs` policy on push.

The server verifies the token, then hands its policy to `git http-backend` in the CGI
environment (`CODESTORE_REF_POLICY`, JSON); http-backend passes its environment on to
`git receive-pack`, which runs this hook with the pushed `old new ref` lines on stdin.
Refusing here refuses the whole push atomically, before any ref moves.

Under `GIT_NAMESPACE` git 2.39 gives the hook the un-namespaced names
(`refs/heads/feat`, not `refs/namespaces/ephemeral/refs/heads/feat`); the prefix is
stripped anyway so a pattern always matches the name the client pushed.

The `verify-sig` op cannot be checked here (the dev server holds no signing keys), so a
push it covers is refused saying so, never let through unchecked: a push that passes
here must not be one Code Storage would refuse.

This module is imported by the hook process on every push: standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence

from git_credential_codestore.vocab import ref_ops

from .. import jsontext

POLICY_ENV = "CODESTORE_REF_POLICY"

Policy = Sequence[tuple[str, Sequence[str]]]


def strip_namespace(ref: str, namespace: str | None) -> str:
    if namespace:
        prefix = "".join(f"refs/namespaces/{part}/" for part in namespace.split("/") if part)
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def _is_zero(oid: str) -> bool:
    return set(oid) == {"0"}


def is_forced(old: str, new: str) -> bool:
    """A deletion, or an update whose old tip is not an ancestor of the new one."""
    if _is_zero(new):
        return True
    if _is_zero(old):
        return False
    proc = subprocess.run(
        ["git", "merge-base", "--is-ancestor", old, new],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # 0: ancestor (fast-forward), 1: not an ancestor; anything else is an error,
    # and a policy check that cannot decide must refuse.
    return proc.returncode != 0


def refusals(lines: Iterable[str], policy: Policy, namespace: str | None = None) -> list[str]:
    """One message per pushed ref the policy refuses."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        old, new, ref = parts
        name = strip_namespace(ref, namespace)
        ops = ref_ops(policy, name)
        if "no-push" in ops:
            out.append(f"{name}: the token's ref policy forbids pushing to it (no-push)")
        elif "no-force-push" in ops and is_forced(old, new):
            what = "deleting it" if _is_zero(new) else "a non-fast-forward update"
            out.append(f"{name}: the token's ref policy forbids {what} (no-force-push)")
        elif "verify-sig" in ops:
            out.append(f"{name}: the token's ref policy requires verified signatures (verify-sig), which the dev server cannot check")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    raw = os.environ.get(POLICY_ENV)
    if not raw:
        # Pushed without the dev server (an operator working on the data dir directly).
        return 0
    try:
        policy = [(str(p), [str(o) for o in ops]) for p, ops in jsontext.loads(raw)]
    except (ValueError, TypeError):
        print("codestore: the server passed an unreadable ref policy; refusing the push", file=sys.stderr)
        return 1
    errors = refusals(sys.stdin.read().splitlines(), policy, os.environ.get("GIT_NAMESPACE"))
    for message in errors:
        print(f"codestore: refused (denied by policy): {message}", file=sys.stderr)
    return 1 if errors else 0


HOOK_SCRIPT = """#!{python}
# Installed by `codestore dev-server`: enforces the token's refs policy on push.
import sys
from git_credential_codestore.devserver.hooks import main
sys.exit(main())
"""


def install(hooks_dir: str) -> str:
    """Write the pre-receive hook into `hooks_dir` (used as core.hooksPath); returns it."""
    os.makedirs(hooks_dir, exist_ok=True)
    from git_credential_codestore.files import write_atomic

    write_atomic(os.path.join(hooks_dir, "pre-receive"), HOOK_SCRIPT.format(python=sys.executable), 0o755)
    return hooks_dir


if __name__ == "__main__":
    raise SystemExit(main())
