#!/usr/bin/env bash
# Make the public base image the Dockerfiles build FROM (debian:bookworm-slim) available to
# this Docker engine. With a registry nothing is made: `docker build` pulls the official image.
# Without one (the build and CI machines here reach only package registries) it makes a
# stand-in of the same name from Debian's own packages (debootstrap --variant=minbase), says
# so, and labels it `org.dormant.stand-in`, so it is never mistaken for the official image.
# The root file system is cached per machine in $DORMANT_CACHE (default /var/cache/dormant).
#
# Usage: scripts/base-images.sh           make the stand-in when the image is missing
#        scripts/base-images.sh --remove  remove a stand-in this script made (cache is kept)
set -euo pipefail
BASE=debian:bookworm-slim
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${DORMANT_CACHE:-/var/cache/dormant}
LABEL=org.dormant.stand-in
say() { printf '\033[1m[base-images]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[base-images] %s\033[0m\n' "$*" >&2; exit 1; }

stand_in_label() { docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$BASE" 2>/dev/null; }

if [[ ${1:-} == --remove ]]; then
  if [[ -n $(stand_in_label || true) ]]; then
    docker image rm "$BASE" >/dev/null && say "removed the stand-in $BASE"
  fi
  exit 0
fi

if docker image inspect "$BASE" >/dev/null 2>&1; then
  if [[ -n $(stand_in_label) ]]; then
    say "$BASE here is a local stand-in built from Debian packages, not the official image"
  fi
  exit 0
fi
if docker pull -q "$BASE" >/dev/null 2>&1; then
  say "pulled the official $BASE"
  exit 0
fi

arch=$(dpkg --print-architecture)
tarball=$CACHE/debian-$SUITE-minbase-$arch.tar
if [[ ! -s $tarball ]]; then
  [[ $(id -u) -eq 0 ]] || die "no registry reachable and building the stand-in needs root (debootstrap)"
  command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  say "no registry reachable: building a stand-in for $BASE with debootstrap (cached in $tarball)"
  root=$(mktemp -d /var/tmp/dormant-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  rm -f "$root.log"
  # What the official slim image also leaves out or sets: no docs, no apt lists, the same
  # suites (updates and security) in deb822 form.
  rm -rf "$root"/usr/share/{doc,man,info}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  rm -f "$root"/etc/apt/sources.list
  cat >"$root"/etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  mkdir -p "$CACHE"
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
say "importing $tarball as $BASE (stand-in, labelled $LABEL)"
docker import \
  -c "LABEL $LABEL=\"debootstrap --variant=minbase $SUITE, made by scripts/base-images.sh; not the official image\"" \
  -c 'CMD ["bash"]' "$tarball" "$BASE" >/dev/null
