#!/bin/sh
# What runs inside every sandbox recipe (installed in the image as codestore-work).
#
# Clones the +ephemeral namespace of CODESTORE_REPO with a grant, continues
# CODESTORE_BRANCH where an earlier sandbox left it (or starts it), runs CODESTORE_TASK in
# the work tree, then commits and pushes. The sandbox needs only the agent's address
# (CODESTORE_AGENT_URL or CODESTORE_AGENT_SOCK) and the grant (CODESTORE_GRANT_FILE or
# CODESTORE_GRANT): no key, no token, nothing secret in argv. Every step's exit code is
# checked (set -e); the script exits non-zero on the first failure.
set -eu

repo=${CODESTORE_REPO:?set CODESTORE_REPO to ORG/REPO, e.g. acme/team/app}
branch=${CODESTORE_BRANCH:?set CODESTORE_BRANCH, e.g. sandbox/task-42}
work=${CODESTORE_WORKDIR:-$HOME/work}
task=${CODESTORE_TASK:-date -u > sandbox-was-here.txt}
url="codestore://$repo+ephemeral"

git config --global user.name >/dev/null 2>&1 || git config --global user.name "codestore sandbox"
git config --global user.email >/dev/null 2>&1 || git config --global user.email "sandbox@localhost"

# Continue the branch if another sandbox already pushed it (failover), else start it.
found=0
git ls-remote --exit-code --heads "$url" "refs/heads/$branch" >/dev/null || found=$?
case $found in
  0) git clone --quiet --depth 1 --single-branch --branch "$branch" "$url" "$work" ;;
  2) git clone --quiet --depth 1 "$url" "$work"
     git -C "$work" checkout --quiet -b "$branch" ;;
  *) echo "codestore-work: cannot reach $url (git ls-remote exit $found)" >&2; exit "$found" ;;
esac

cd "$work"
sh -c "$task"
git add -A
git commit --quiet --allow-empty -m "sandbox: ${task}"
git push --quiet origin "HEAD:refs/heads/$branch"
echo "codestore-work: pushed $(git rev-parse HEAD) to $branch in $repo+ephemeral"
