#!/usr/bin/env bash
# One-time (and safe to re-run) set-up of everything dormant needs on a Debian 12 machine:
# Debian packages, a .venv with the project, and running redis-server + virtlogd + libvirtd.
# Usage: scripts/setup.sh [--no-services] [--with-rabbitmq]
#   --with-rabbitmq: also Debian's rabbitmq-server, for the tests and the fault suite (they start
#   private nodes of their own; the package's system node is never used or needed).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
              qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc)
NO_SERVICES=
for arg in "$@"; do
  case $arg in
    --no-services) NO_SERVICES=1 ;;
    --with-rabbitmq) APT_PACKAGES+=(rabbitmq-server) ;;
    *) echo "usage: $0 [--no-services] [--with-rabbitmq]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# Debian's own python3 needs python3-venv for `-m venv`; other Pythons (pyenv) bring it.
"$PY" -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] %s\033[0m\n' "$*" >&2; exit 1; }

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
