#!/bin/sh
# Run one sandbox task in Docker with a per-grant agent socket mounted (Linux hosts).
#
#   CODESTORE_REPO=acme/team/app CODESTORE_BRANCH=sandbox/task-1 examples/docker/run.sh
#
# On the Docker host, as the user who holds the key: `codestore agent start` first.
# The grant socket *is* the grant: nothing secret enters the container's argv, env or
# image. Docker Desktop (macOS, Windows) runs containers in a VM that a Unix socket
# mount does not cross: use the agent's HTTPS listener there (docs/sandboxes.md).
set -eu
repo=${CODESTORE_REPO:?set CODESTORE_REPO to ORG/REPO}
branch=${CODESTORE_BRANCH:?set CODESTORE_BRANCH}
image=${CODESTORE_IMAGE:-codestore-sandbox}
id_repo=${repo#*/}

# One line each: the grant's id (to revoke it) and its socket. No JSON to parse.
out=$(codestore grant create --repo "$id_repo" --scopes "git:read git:write" --ephemeral-only \
        --max-ttl 600 --expires-in 2h --sub "docker-$branch" --own-socket --print id --print socket)
id=$(printf '%s\n' "$out" | sed -n 1p)
sock=$(printf '%s\n' "$out" | sed -n 2p)
trap 'codestore grant revoke "$id" >/dev/null' EXIT

# The socket is 0600 and owned by you: run the container as your uid. CODESTORE_AGENT_SOCK
# names the agent, so the helpers leave scopes to it (no scope settings in the container):
# it knows the socket is the grant's and allows exactly what the grant does.
docker run --rm --user "$(id -u):$(id -g)" \
  -v "$sock:/run/codestore/agent.sock" \
  -e CODESTORE_AGENT_SOCK=/run/codestore/agent.sock \
  -e HOME=/tmp/home \
  -e CODESTORE_REPO="$repo" -e CODESTORE_BRANCH="$branch" \
  "$image" sh -c 'mkdir -p "$HOME" && exec codestore-work'
