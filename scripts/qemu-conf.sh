#!/usr/bin/env bash
# Make /etc/libvirt/qemu.conf let libvirtd run guests on a machine of the kind ENVIRONMENT.md
# describes (no systemd, root, no security driver) -- without ever weakening a libvirt
# installation that was configured before dormant came.
#
# It writes its three settings (and the extras below) only where libvirt was not configured
# before:
#   * there is no qemu.conf yet (Debian 12's libvirt-daemon-driver-qemu ships none), or
#   * the file is still the package's own (its md5 is the one dpkg recorded), or
#   * set-up installed the libvirt packages in this very run (SERVICES_FRESH_LIBVIRT=1), or
#   * CI=true (a throw-away machine).
# Anywhere else it prints what is needed and exits 1, leaving the file untouched.
#
# The extras keep guests startable where the machine cannot give them what libvirt asks for
# by default (an unprivileged container: no CAP_SYS_ADMIN, read-only cgroups). They are
# written only together with the three settings, never on their own into a file set up before:
#   remember_owner = 0      always. libvirt keeps each file's previous owner in trusted.*
#                           xattrs, which need CAP_SYS_ADMIN ("Unable to set XATTR
#                           trusted.libvirt.security.dac ... Operation not permitted"). With
#                           guests as root and no security driver it only decides who owns a
#                           disk after its guest stops: root (which it is while the guest runs).
#   cgroup_controllers = [ ]  only where a cgroup hierarchy is mounted read-only, so libvirt
#                           cannot make a guest's group anyway ("Failed to create v1 controller
#                           cpu for group: Read-only file system"); cpu.time then comes from
#                           /proc. A host that can have guest cgroups keeps them.
#   namespaces = [ ]        only where this process cannot make a mount namespace (QEMU's
#                           private /dev), so libvirt's would fail too.
# SERVICES_QEMU_CONF overrides the path and SERVICES_MOUNTINFO the mount table the cgroup
# check reads (default /proc/self/mountinfo); only the tests set them.
set -euo pipefail
conf=${SERVICES_QEMU_CONF:-/etc/libvirt/qemu.conf}
package_conf=/etc/libvirt/qemu.conf
settings=('user = "root"' 'group = "root"' 'security_driver = "none"')
say() { printf '\033[1m[services]\033[0m %s\n' "$*"; }

has() {  # has 'key = value': the file sets exactly this (spaces around = optional)
  local key=${1%% =*} value
  value=$(printf '%s' "${1#*= }" | sed 's/[][\\.*^$+?(){}|]/\\&/g')  # literally
  grep -qE "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${value}[[:space:]]*$" "$conf" 2>/dev/null
}
cgroups_read_only() {  # some cgroup or cgroup2 hierarchy is mounted read-only here
  awk '{ for (i = 7; i < NF && $i != "-"; i++) {}
         if ($(i + 1) ~ /^cgroup2?$/ && $6 ~ /(^|,)ro(,|$)/) found = 1 }
       END { exit !found }' "${SERVICES_MOUNTINFO:-/proc/self/mountinfo}"
}
pristine() {  # the file is byte for byte the one a Debian package installed
  local expected
  expected=$(dpkg-query -W -f='${Conffiles}\n' 2>/dev/null \
             | awk -v f="$package_conf" '$1 == f { print $2; exit }') || true
  [[ -n $expected && $(md5sum <"$conf" | cut -d' ' -f1) == "$expected" ]]
}

needed=()
for line in "${settings[@]}"; do has "$line" || needed+=("$line"); done
((${#needed[@]})) || exit 0  # already set (by an earlier run, or by the administrator)

why=""
if [[ ! -e $conf ]]; then why="there is no $conf yet"
elif [[ ${SERVICES_FRESH_LIBVIRT:-} == 1 ]]; then why="set-up installed libvirt in this run"
elif [[ ${CI:-} == true ]]; then why="CI=true"
elif pristine; then why="$conf is still the package's own"
fi
if [[ -z $why ]]; then
  {
    echo "[services] $conf was configured before dormant came; it is left untouched."
    echo "[services] libvirtd on this kind of machine (no systemd, guests as root) needs there:"
    printf '[services]     %s\n' "${needed[@]}"
    echo "[services] add them yourself if that is right for this host, or point dormant at a"
    echo "[services] libvirtd that already runs (DORMANT_LIBVIRT_URI), then re-run."
  } >&2
  exit 1
fi

extras=('remember_owner = 0')
cgroups_read_only && extras+=('cgroup_controllers = [ ]')
unshare --mount true 2>/dev/null || extras+=('namespaces = [ ]')
for line in "${extras[@]}"; do has "$line" || needed+=("$line"); done
say "configuring $conf ($why): ${needed[*]}"
mkdir -p "$(dirname "$conf")"
touch "$conf"
for line in "${needed[@]}"; do
  key=${line%% =*}
  if grep -qE "^[[:space:]]*${key}[[:space:]]*=" "$conf"; then
    sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*|${line}|" "$conf"
  else
    echo "$line" >>"$conf"
  fi
done
