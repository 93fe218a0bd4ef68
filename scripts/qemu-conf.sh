#!/usr/bin/env bash
# Make /etc/libvirt/qemu.conf let libvirtd run guests on a machine of the kind ENVIRONMENT.md
# describes (no systemd, root, no security driver) -- without ever weakening a libvirt
# installation that was configured before dormant came.
#
# It writes its three settings only where libvirt was not configured before:
#   * there is no qemu.conf yet (Debian 12's libvirt-daemon-driver-qemu ships none), or
#   * the file is still the package's own (its md5 is the one dpkg recorded), or
#   * set-up installed the libvirt packages in this very run (SERVICES_FRESH_LIBVIRT=1), or
#   * CI=true (a throw-away machine).
# Anywhere else it prints what is needed and exits 1, leaving the file untouched.
# SERVICES_QEMU_CONF overrides the path; only the tests set it.
set -euo pipefail
conf=${SERVICES_QEMU_CONF:-/etc/libvirt/qemu.conf}
package_conf=/etc/libvirt/qemu.conf
settings=('user = "root"' 'group = "root"' 'security_driver = "none"')
say() { printf '\033[1m[services]\033[0m %s\n' "$*"; }

has() {  # has 'key = "value"': the file sets exactly this (spaces around = optional)
  local key=${1%% =*} value=${1#*= }
  grep -qE "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${value}[[:space:]]*$" "$conf" 2>/dev/null
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
