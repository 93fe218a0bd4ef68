#!/usr/bin/env bash
# make fresh-test: the README's two commands on a machine that has never seen dormant. A
# container from debian:bookworm-slim (scripts/base-images.sh makes a stand-in where no
# registry answers) gets only make and git (no recommended packages either), clones the commit
# checked out here, and tests/fresh/check.sh runs in that clone: `make run` until its banner,
# the README's first snippet verbatim, Ctrl-C, then the unit tests the README's way (see that
# file). The container, its clone and the bundle it came from are removed at the end, and
# dockerd is stopped when this script started it; the base image and the caches are kept.
#
# The container has a network of its own (Docker's default bridge), not the host's: its
# redis-server must answer on 127.0.0.1:6379 because the snippet says so, and Flower on 5555,
# without meeting the host's own services on those ports (CI's `make test` and developers'
# `make run` leave a redis-server on 6379). The bridge reaches the package registries here
# (apt over http, PyPI over TLS); the CAs of a TLS-inspecting proxy (Debian keeps locally
# added ones in /usr/local/share/ca-certificates) are mounted where the container's own
# ca-certificates package picks them up when set-up installs it -- the machine's trust, not a
# step of dormant's.
#   --init   an init reaps orphans, as on a machine: without one, libvirtd's daemonised
#            children stayed zombies and its guest starts hung.
# Caches, in $DORMANT_CACHE/fresh-test (default /var/cache/dormant): apt's downloaded .debs and
# pip's downloads, never pip's built wheels -- libvirt-python is compiled every time, which is
# what needs python3-dev. The packages are still installed by set-up in every run.
# Uncommitted changes are not part of the test: it clones the commit (HEAD).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
NAME=dormant-fresh-test
IMAGE=debian:bookworm-slim
CACHE=${DORMANT_CACHE:-/var/cache/dormant}/fresh-test
say() { printf '\033[1m[fresh-test]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[fresh-test] %s\033[0m\n' "$*" >&2; exit 1; }
lap() { say "$1: $(( $(date +%s) - T0 )) s since start"; }
[[ $(id -u) -eq 0 ]] || die "run as root: it installs Docker and starts dockerd"

# One at a time per machine: the name and the caches are shared.
exec 8>/tmp/dormant-fresh-test.lock
if ! flock -n 8; then
  say "waiting for another make fresh-test on this machine"
  flock -w 3600 8 || die "waited an hour for /tmp/dormant-fresh-test.lock"
fi

if ! dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q 'install ok installed'; then
  say "installing docker.io"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

work=$(mktemp -d /tmp/dormant-fresh-test.XXXXXX)
started_dockerd=""
cleanup() {
  local status=$?
  set +e
  docker rm -f "$NAME" >/dev/null 2>&1
  if [[ -n $started_dockerd ]]; then
    say "stopping the dockerd this test started"
    kill "$started_dockerd"; wait "$started_dockerd"
  fi
  rm -rf "$work"
  if ((status == 0)); then lap "make fresh-test passed"; else lap "make fresh-test FAILED"; fi
  exit "$status"
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: /var/log/dormant-dockerd.log)"
  dockerd >/var/log/dormant-dockerd.log 2>&1 8>&- &
  started_dockerd=$!
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || die "dockerd did not start (see /var/log/dormant-dockerd.log)"
fi
docker rm -f "$NAME" >/dev/null 2>&1 || true  # a run killed half-way left it
scripts/base-images.sh
lap "Docker and $IMAGE ready"

# The commit under test, as one file the container clones from (a work tree's .git may be a
# pointer into another checkout).
commit=$(git rev-parse HEAD)
[[ -z $(git status --porcelain --untracked-files=no) ]] \
  || say "note: uncommitted changes here are not tested, only commit ${commit:0:12}"
git bundle create -q "$work/dormant.bundle" HEAD

mkdir -p "$CACHE/apt" "$CACHE/pip"
rm -rf "$CACHE/pip/wheels"  # built wheels: libvirt-python must be compiled in the test
mounts=(-v "$work/dormant.bundle:/srv/dormant.bundle:ro"
        -v "$CACHE/apt:/var/cache/apt/archives" -v "$CACHE/pip:/root/.cache/pip")
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
shopt -u nullglob
((${#local_cas[@]})) && mounts+=(-v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro)

say "starting $NAME from $IMAGE (its own network; no /dev/kvm, unprivileged)"
docker run -d --init --name "$NAME" --hostname "$NAME" "${mounts[@]}" "$IMAGE" \
  sleep infinity >/dev/null
say "in $NAME: apt-get install make git; git clone (commit ${commit:0:12})"
docker exec "$NAME" bash -c '
  set -euo pipefail
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make git \
    >/dev/null
  git -c advice.detachedHead=false clone -q /srv/dormant.bundle /root/dormant'
[[ $(docker exec "$NAME" git -C /root/dormant rev-parse HEAD) == "$commit" ]] \
  || die "the clone in $NAME is not at $commit"
lap "clone ready"
docker exec -w /root/dormant "$NAME" bash tests/fresh/check.sh
