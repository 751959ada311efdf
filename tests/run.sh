#!/usr/bin/env bash
# The test command (README, CI): install what the tests need, then run them all.
# git (with git-http-backend) and libfaketime come from apt-get when missing; Python packages from PyPI
# into ./.venv. ruff and mypy check the tree, then pytest runs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# git (with git-http-backend) drives every end-to-end test; libfaketime moves the clock of
# git, the helpers and the dev server together for the long-session test.
faketime_lib() { ls /usr/lib/*/faketime/libfaketime.so.1 2>/dev/null | head -n 1; }
if ! command -v git >/dev/null 2>&1 || [ ! -x "$(git --exec-path 2>/dev/null)/git-http-backend" ] || [ -z "$(faketime_lib)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git libfaketime >/dev/null
  else
    echo "tests/run.sh: the tests need git (with git-http-backend) and libfaketime; install them" >&2
    exit 1
  fi
fi
# The agent's fleet tests run a real PostgreSQL (the replicas' shared store) and a real
# SoftHSM2 token (the PKCS#11 signer), also through p11-kit's proxy module (libp11-kit0),
# which holds forked workers to the PKCS#11 standard, and through p11-kit's server and
# client module (p11-kit), a network HSM that a test can make stop answering.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v softhsm2-util >/dev/null 2>&1 \
   || ! ls /usr/lib/*/libp11-kit.so.0 >/dev/null 2>&1 || ! command -v p11-kit >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql softhsm2 libp11-kit0 p11-kit >/dev/null
  else
    echo "tests/run.sh: the tests need PostgreSQL (Debian: postgresql), SoftHSM2 (softhsm2) and p11-kit (libp11-kit0, p11-kit); install them" >&2
    exit 1
  fi
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
}
[ -x .venv/bin/python ] || python3 -m venv .venv
# The distribution was called "codestore" before it became codestore-git: drop a stale record
# first (after the install, its uninstall would delete the scripts both share).
.venv/bin/python -m pip uninstall -q -y --disable-pip-version-check codestore >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,recipes]'
# Lint and types first (configured in pyproject.toml): either failing fails the run.
.venv/bin/python -m ruff check --quiet .
.venv/bin/python -m mypy
# One pytest process per core (pytest-xdist): each has its own session fixtures (a
# PostgreSQL server, the sandbox image); `-n 0` runs the suite in one process.
exec .venv/bin/python -m pytest -q -n auto "$@"
