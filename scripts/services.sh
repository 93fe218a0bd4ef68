#!/usr/bin/env bash
# Start redis-server, virtlogd and libvirtd when they are not running (no systemd needed).
# Follows the recipe in ENVIRONMENT.md: the QEMU driver needs a libvirt-qemu user and a kvm
# group, and runs guests as root without a security driver on these machines -- settings it
# writes only where libvirt was not configured before it (scripts/qemu-conf.sh): a libvirtd
# that merely stopped on a real hypervisor host is never weakened.
set -euo pipefail
say() { printf '\033[1m[services]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[services] %s\033[0m\n' "$*" >&2; exit 1; }

if ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  say "starting redis-server on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --appendonly yes \
    --dir /var/lib/redis --logfile /var/log/redis/dormant-dev.log 2>/dev/null \
    || redis-server --bind 127.0.0.1 --port 6379 --daemonize yes
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p 6379 ping >/dev/null || die "redis-server did not start"
fi

if virsh -c qemu:///system version >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  if [[ -S /var/run/libvirt/libvirt-sock ]]; then
    die "libvirtd runs but $(id -un) cannot reach qemu:///system: run as root, or join the group that owns /var/run/libvirt/libvirt-sock"
  fi
  die "libvirtd is not running and starting it needs root: sudo $0"
fi
# A daemon of *this* machine runs: its pid file names a live process of that name. (pgrep would
# also see a libvirtd inside a container on this host, and then none would be started here.)
running() { local pid; pid=$(cat "/var/run/$1.pid" 2>/dev/null) && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; }
for group in kvm libvirt-qemu; do getent group "$group" >/dev/null || groupadd --system "$group"; done
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home -g kvm libvirt-qemu
# qemu.conf is written only where libvirt was not configured before (see qemu-conf.sh).
"$(dirname "$0")/qemu-conf.sh" || die "not starting libvirtd: see the settings above"
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu/save
running virtlogd || virtlogd -d
running libvirtd || { say "starting libvirtd"; libvirtd -d; }
for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd did not answer on qemu:///system (see /var/log/libvirt/libvirtd.log)"
[[ -w /dev/kvm ]] || say "note: /dev/kvm is not usable; guests will run under TCG emulation"
say "libvirtd is up"
