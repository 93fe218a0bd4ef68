#!/usr/bin/env bash
# One-time (and safe to re-run) set-up of everything dormant needs on a Debian 12 machine:
# Debian packages, a .venv with the project, and running redis-server + virtlogd + libvirtd.
# Usage: scripts/setup.sh [--no-services] [--with-rabbitmq]
#   --with-rabbitmq: also Debian's rabbitmq-server, for the tests and the fault suite (they start
#   private nodes of their own; the package's system node is never used or needed).
set -euo pipefail
cd "$(dirname "$0")/.."

# libvirt-python has no wheel: it compiles against libvirt-dev (gcc, libc6-dev, pkg-config) and
# the interpreter's own headers (below). procps: the test harness's pgrep. ca-certificates: pip
# reaches PyPI over TLS. Named even where a dependency brings them (a bare debian:bookworm-slim
# has none of these; tests/fresh/check.sh proves the list there).
APT_PACKAGES=(redis-server redis-sentinel libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
              qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc libc6-dev procps
              ca-certificates)
NO_SERVICES=
for arg in "$@"; do
  case $arg in
    --no-services) NO_SERVICES=1 ;;
    --with-rabbitmq) APT_PACKAGES+=(rabbitmq-server) ;;
    *) echo "usage: $0 [--no-services] [--with-rabbitmq]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] %s\033[0m\n' "$*" >&2; exit 1; }

# The interpreter that makes .venv, asked itself: Debian's python3 needs python3-venv for
# `-m venv` and python3-dev for Python.h; other Pythons (pyenv) usually bring both.
if ! command -v "$PY" >/dev/null; then
  [[ $PY == python3 ]] || die "PYTHON=$PY: no such interpreter"
  APT_PACKAGES+=(python3 python3-venv python3-dev)  # a bare Debian 12 has no Python at all
else
  "$PY" -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)
  # "<prefix> <X.Y> <1 if Python.h is there>"
  read -r py_prefix py_version py_headers < <("$PY" -c 'import os, sys, sysconfig
include = sysconfig.get_paths()["include"]
print(sys.prefix, "%d.%d" % sys.version_info[:2], int(os.path.isfile(os.path.join(include, "Python.h"))))') \
    || die "$PY does not run"
  if [[ $py_headers != 1 ]]; then
    if [[ $py_prefix != /usr ]]; then
      die "$PY ($py_prefix) has no C headers (Python.h), which libvirt-python needs to build:
  use an interpreter installed with its headers, or Debian's own (PYTHON=/usr/bin/python3)"
    elif [[ $(readlink -f "$(command -v "$PY")") == $(readlink -f /usr/bin/python3 2>/dev/null) ]]; then
      APT_PACKAGES+=(python3-dev)
    else
      APT_PACKAGES+=("python$py_version-dev")
    fi
  fi
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    die "missing Debian packages: ${missing[*]}
  install them as root:  sudo apt-get install -y ${missing[*]}
  then re-run $0"
  fi
  command -v apt-get >/dev/null || die "no apt-get here; install the equivalent of: ${missing[*]}"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # libvirt is new on this machine: services.sh may configure it (nothing was there before).
  [[ " ${missing[*]} " == *" libvirt-daemon-driver-qemu "* ]] && export SERVICES_FRESH_LIBVIRT=1
fi

# The project's virtualenv (re-used when pyproject.toml has not changed since the last install).
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.dormant-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  say "installing dormant and its test extras into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi

[[ -n $NO_SERVICES ]] && exit 0
scripts/services.sh
