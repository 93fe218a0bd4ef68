#!/usr/bin/env bash
# make deploy-test: the reference deployment for real. Installs and starts what is missing
# (docker.io, docker-compose, debootstrap, socat; dockerd; the project's .venv and libvirtd),
# builds the images from Dockerfile and Dockerfile.redis, then tests/deploy/check.py brings
# docker-compose.yml up under its own project name with generated secrets and a worker for this
# host and checks it (see that file). Everything it started is stopped at the end: the stack
# (down -v), the libvirt socket proxy, and dockerd when this script started it.
#
# The libvirt socket: a non-root worker reaches the host's libvirtd as a member of the group
# that owns the socket, which needs libvirtd to authenticate local clients by the socket's
# permissions (unix_sock_group, unix_sock_rw_perms = "0770", auth_unix_rw = "none"; see
# docs/operations.md). The shared libvirtd here is started with the defaults instead: polkit,
# which needs D-Bus, so it refuses every non-root client. Rather than restart it, this script
# puts a root-owned proxy socket in front of it, mode 0660 and group `libvirt`, which is what
# such a libvirtd would listen on, and mounts that one. When the real socket already lets a
# non-root member of its group in, the worker mounts the real socket.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { printf '\033[1m[deploy-test]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[deploy-test] %s\033[0m\n' "$*" >&2; exit 1; }
lap() { say "$1: $(( $(date +%s) - T0 ))s since start"; }
[[ $(id -u) -eq 0 ]] || die "run as root: it installs Docker, starts dockerd and uses the libvirt socket"

missing=()
for pkg in docker.io docker-compose debootstrap socat; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
scripts/setup.sh >/dev/null   # .venv (the checker's celery + libvirt-python), libvirtd

work=$(mktemp -d /tmp/dormant-deploy-test.XXXXXX)
started_dockerd="" proxy_pid=""
cleanup() {
  local status=$?
  set +e
  # The checker takes the stack down itself (and checks nothing is left); this is for a run
  # that died before it could.
  [[ -n ${COMPOSE:-} ]] && $COMPOSE -p "$DEPLOY_PROJECT" down -v --remove-orphans >/dev/null 2>&1
  if [[ -n $proxy_pid ]]; then kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null; fi
  if [[ -n $started_dockerd ]]; then
    say "stopping the dockerd this test started"
    kill "$started_dockerd"; wait "$started_dockerd"
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: /var/log/dormant-dockerd.log)"
  dockerd >/var/log/dormant-dockerd.log 2>&1 &
  started_dockerd=$!
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || die "dockerd did not start (see /var/log/dormant-dockerd.log)"
fi
if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
export COMPOSE DEPLOY_PROJECT=dormant-deploy-test
# A run killed half-way left its stack: remove it first.
$COMPOSE -p "$DEPLOY_PROJECT" down -v --remove-orphans >/dev/null 2>&1 || true
lap "Docker ready ($COMPOSE)"

scripts/base-images.sh
# pip in the build reaches the index through host networking; a TLS-inspecting proxy's CA
# (Debian keeps locally added CAs in /usr/local/share/ca-certificates) goes to the build stage.
build_args=(--network host)
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
shopt -u nullglob
((${#local_cas[@]})) && build_args+=(--build-arg "BUILD_CA_CERTS=$(cat "${local_cas[@]}")")
say "building dormant:latest and dormant-redis:latest"
docker build -q "${build_args[@]}" -t dormant:latest . >/dev/null
docker build -q --network host -f Dockerfile.redis -t dormant-redis:latest . >/dev/null
lap "images built"
for image in dormant:latest dormant-redis:latest debian:bookworm-slim; do
  say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
done

# The libvirt socket the worker mounts, and the group it joins (see the header).
getent group libvirt >/dev/null || groupadd --system libvirt
export LIBVIRT_GID LIBVIRT_SOCKET=/var/run/libvirt/libvirt-sock
LIBVIRT_GID=$(stat -c %g "$LIBVIRT_SOCKET")
if ! docker run --rm --group-add "$LIBVIRT_GID" -v "$LIBVIRT_SOCKET:/var/run/libvirt/libvirt-sock" \
     dormant:latest python -c 'import libvirt; libvirt.open("qemu:///system")' >/dev/null 2>&1; then
  LIBVIRT_GID=$(getent group libvirt | cut -d: -f3)
  LIBVIRT_SOCKET=$work/libvirt-sock
  say "libvirtd refuses non-root clients here (polkit without D-Bus): the worker gets a proxy socket, group libvirt, mode 0660"
  socat "UNIX-LISTEN:$LIBVIRT_SOCKET,fork,unlink-early,mode=660,user=root,group=$LIBVIRT_GID" \
        UNIX-CONNECT:/var/run/libvirt/libvirt-sock &
  proxy_pid=$!
  for _ in $(seq 50); do [[ -S $LIBVIRT_SOCKET ]] && break; sleep 0.1; done
  chmod 755 "$work"
fi

export REDIS_PASSWORD FLOWER_BASIC_AUTH
REDIS_PASSWORD=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')
FLOWER_BASIC_AUTH=ops:$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(12))')
.venv/bin/python -m tests.deploy.check
lap "deploy-test passed"
