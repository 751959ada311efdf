#!/usr/bin/env bash
# Install codestore into its own virtual environment and put its three programs on PATH.
#
#   ./install.sh [--system|--user] [--prefix DIR] [--bin-dir DIR] [--org ORG] [--base-url URL] [--setup] [--demo]
#                [--extras fleet]
#
# As root it installs system-wide (--system): into /opt/codestore, programs in
# /usr/local/bin, readable by every user, and --setup writes git's system config
# (`codestore setup --system`), so an image built as root works for the non-root user
# it runs as. Otherwise (or with --user) it installs for the current user: into
# ~/.local/share/codestore, programs in ~/.local/bin, and --setup writes ~/.gitconfig.
# Idempotent and non-interactive: safe to run again to upgrade, and inside a sandbox
# image build (Dockerfile RUN, Modal/E2B/Daytona image steps). It needs python3 (3.10+)
# and git; as root on Debian/Ubuntu it installs them with apt-get when they are missing.
# It reaches no network but the package registries; setting up needs no key.
# --extras fleet adds what an agent run as a fleet service uses (docs/fleet.md); a
# sandbox image or a developer machine needs none.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
system=""
prefix=""
bin_dir=""
org=""
base_url=""
do_setup=0
do_demo=0
extras=""

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --system) system=1; shift ;;
    --user) system=0; shift ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_dir=$2; shift 2 ;;
    --org) [ $# -ge 2 ] || die "--org needs a name"; org=$2; shift 2 ;;
    --base-url) [ $# -ge 2 ] || die "--base-url needs a URL"; base_url=$2; shift 2 ;;
    --setup) do_setup=1; shift ;;
    --demo) do_demo=1; shift ;;
    --extras)
      [ $# -ge 2 ] || die "--extras needs a name (fleet)"
      case "$2" in fleet|recipes) extras=$2 ;; *) die "--extras $2: unknown; the extras are fleet and recipes" ;; esac
      shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

chosen=$system  # empty when neither --system nor --user was given
if [ -z "$system" ]; then
  if [ "$(id -u)" = 0 ]; then system=1; else system=0; fi
fi
# A system install links its venv to this python3; one under root's home (pyenv,
# conda) would be unreadable by the users an image runs as.
python_others_can_run() {
  python3 - <<'CHECK'
import os, stat, sys
p = os.path.realpath(sys.executable)
ok = os.stat(p).st_mode & stat.S_IXOTH
while ok and p != "/":
    p = os.path.dirname(p)
    ok = os.stat(p).st_mode & stat.S_IXOTH
sys.exit(0 if ok else 1)
CHECK
}
if [ "$system" = 1 ] && command -v python3 >/dev/null 2>&1 && ! python_others_can_run; then
  where=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
  if [ -z "$chosen" ]; then
    # Root by default only: a developer trying codestore as root (pyenv's python) gets a
    # working install for root, not a refusal; an image build asks --system and is told.
    echo "install.sh: $where is not usable by other users, so installing for $(id -un) only (--system, with a system python3 first on PATH, installs for every user)" >&2
    system=0
  else
    die "python3 resolves to $where which other users cannot run; put a system python3 (e.g. /usr/bin) first on PATH for a system install"
  fi
fi
if [ "$system" = 1 ]; then
  prefix=${prefix:-/opt/codestore}
  bin_dir=${bin_dir:-/usr/local/bin}
  # Every user must read and run what root installs here (an image built as root runs
  # as another user): no group/other bits masked, whatever umask the build has.
  umask 022
  if [ -n "$org$base_url" ] && [ "$do_setup" = 0 ]; then
    die "--org/--base-url go into git's system config with --setup; add --setup"
  fi
else
  data_home=${XDG_DATA_HOME:-$HOME/.local/share}
  prefix=${prefix:-$data_home/codestore}
  bin_dir=${bin_dir:-$HOME/.local/bin}
fi

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    die "$* missing: install it with your package manager, then run install.sh again"
  fi
}

command -v git >/dev/null 2>&1 || apt_install git
command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "python3 is $(python3 -V 2>&1); codestore needs 3.10 or newer"
# Debian splits venv (and ensurepip) out of python3.
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv


venv="$prefix/venv"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$prefix"
  python3 -m venv "$venv"
fi
# Releases before 0.1.0's rename were installed as the distribution "codestore" (a name
# another project holds on PyPI); this venv is ours alone, so drop that stale record
# first (after the install, its uninstall would delete the files both share).
"$venv/bin/python" -m pip uninstall -q -y --disable-pip-version-check codestore >/dev/null 2>&1 || true
# pip builds a local project in its own tree (setuptools' build/ and *.egg-info): a build/lib
# left from an older checkout keeps modules since removed, and two installs from one tree at
# once collide there. So the build happens in a private directory of its own, removed after.
build=$(mktemp -d "${TMPDIR:-/tmp}/codestore-build.XXXXXX")
trap 'rm -rf "$build"' EXIT
printf '[build]\nbuild_base = %s/build\n[egg_info]\negg_base = %s\n' "$build" "$build" >"$build/setup.cfg"
DIST_EXTRA_CONFIG="$build/setup.cfg" \
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$here${extras:+[$extras]}"
rm -rf "$build"
trap - EXIT

# git runs the two helpers on every fetch and push. pip's generated launcher runs `site`
# and imports `re` to tidy argv[0]: about 7 ms of a ~20 ms helper. Ours starts Python
# isolated (-I) without site (-S) and puts the venv's packages on sys.path itself.
# (A path with spaces cannot go in a shebang: then pip's launcher stays.)
purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
write_launcher() {  # NAME MODULE
  case "$venv$purelib" in *[[:space:]]*) return 0 ;; esac
  [ "${#venv}" -lt 100 ] || return 0  # Linux truncates shebang lines at 127 bytes
  cat > "$venv/bin/$1.tmp" <<LAUNCHER
#!$venv/bin/python -IS
# Written by codestore's install.sh (see there); pip install rewrites it as pip's own.
import sys
sys.path.append("$purelib")
from $2 import main
sys.exit(main())
LAUNCHER
  chmod 755 "$venv/bin/$1.tmp"
  mv -f "$venv/bin/$1.tmp" "$venv/bin/$1"
}
write_launcher git-credential-codestore git_credential_codestore.credential
write_launcher git-remote-codestore remote_helper.main

if [ "$system" = 1 ]; then
  chmod -R a+rX "$prefix"
fi

mkdir -p "$bin_dir"
for prog in codestore git-credential-codestore git-remote-codestore; do
  # A link by name: git finds git-credential-codestore and git-remote-codestore on PATH,
  # and an upgrade replaces the target without touching git's configuration.
  ln -sfn "$venv/bin/$prog" "$bin_dir/$prog"
done
echo "install.sh: installed codestore $("$venv/bin/codestore" --version | awk '{print $NF}') in $venv; programs linked in $bin_dir"
case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "install.sh: add $bin_dir to PATH (e.g. export PATH=\"$bin_dir:\$PATH\") so git finds the helpers" ;;
esac

if [ "$system" = 1 ]; then
  if [ "$do_setup" = 1 ]; then
    PATH="$bin_dir:$PATH" "$bin_dir/codestore" setup --system ${org:+--org "$org"} ${base_url:+--base-url "$base_url"}
  fi
else
  if [ -n "$org" ]; then
    "$bin_dir/codestore" config set org "$org"
  fi
  if [ -n "$base_url" ]; then
    "$bin_dir/codestore" config set base_url "$base_url"
  fi
  if [ "$do_setup" = 1 ]; then
    PATH="$bin_dir:$PATH" "$bin_dir/codestore" setup
  fi
fi
if [ "$do_demo" = 1 ]; then
  PATH="$bin_dir:$PATH" exec "$bin_dir/codestore" demo
fi
