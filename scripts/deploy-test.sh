#!/usr/bin/env bash
# make deploy-test: the reference deployment for real. Installs and starts what is missing
# (docker.io, docker-compose, debootstrap, socat; dockerd; the project's .venv and libvirtd),
# builds the images from Dockerfile and Dockerfile.redis, then tests/deploy/check.py brings
# docker-compose.yml up under its own project name with generated secrets and a worker for this
# host and checks it (see that file); then the same stack on RabbitMQ (Dockerfile.rabbitmq,
# docker-compose.rabbitmq.yml, tests/deploy/check_rabbitmq.py). DORMANT_DEPLOY_BROKERS chooses
# ("redis rabbitmq" by default; "redis" or "rabbitmq" for one). Everything it started is
# stopped at the end: the stack
# (down -v), the libvirt socket proxy or libvirtd's own configuration, and dockerd when this
# script started it.
#
# The libvirt socket: a non-root worker reaches the host's libvirtd as a member of the group
# that owns the socket, which needs libvirtd to know uid 10001 and to let that group in by the
# socket's permissions (docs/production.md, "The hypervisor host"). libvirtd here runs with its defaults
# (polkit, which needs D-Bus, so it refuses every non-root client). DORMANT_DEPLOY_LIBVIRT says
# what to do about it:
#   direct       the real socket already lets the worker in: mount it (chosen when it does);
#   reconfigure  add the user and restart libvirtd configured like that, restore it at the end
#                (the default in CI, where nobody else uses libvirtd);
#   proxy        leave the shared libvirtd alone and mount a root-owned proxy socket in front
#                of it, mode 0660, group libvirt (the default on a developer's machine).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { printf '\033[1m[deploy-test]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[deploy-test] %s\033[0m\n' "$*" >&2; exit 1; }
lap() { say "$1: $(( $(date +%s) - T0 ))s since start"; }
[[ $(id -u) -eq 0 ]] || die "run as root: it installs Docker, starts dockerd and uses the libvirt socket"
BROKERS=${DORMANT_DEPLOY_BROKERS:-redis rabbitmq}
for broker in $BROKERS; do
  [[ $broker == redis || $broker == rabbitmq ]] || die "DORMANT_DEPLOY_BROKERS: redis and/or rabbitmq, not $broker"
done

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
started_dockerd="" proxy_pid="" reconfigured="" created=()
restart_libvirtd() {  # [libvirtd options]: replace the running libvirtd, wait until it answers
  local pid
  pid=$(cat /var/run/libvirtd.pid 2>/dev/null || true)
  if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  libvirtd -d "$@" 9>&-
  for _ in $(seq 150); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "libvirtd did not answer after a restart (see /var/log/libvirt/libvirtd.log)"
}
cleanup() {
  local status=$?
  set +e
  # The checker takes the stack down itself (and checks nothing is left); this is for a run
  # that died before it could.
  [[ -n ${COMPOSE:-} ]] && RABBITMQ_PASSWORD=${RABBITMQ_PASSWORD:-x} \
    REDIS_PASSWORD=${REDIS_PASSWORD:-x} FLOWER_BASIC_AUTH=${FLOWER_BASIC_AUTH:-x:x} \
    $COMPOSE -p "$DEPLOY_PROJECT" -f docker-compose.yml -f docker-compose.rabbitmq.yml \
    down -v --remove-orphans >/dev/null 2>&1
  if [[ -n $proxy_pid ]]; then kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null; fi
  if [[ -n $reconfigured ]]; then
    say "restoring libvirtd's own configuration"
    kill -CONT "$(cat /var/run/libvirtd.pid)" 2>/dev/null
    (restart_libvirtd)
  fi
  for ((i = ${#created[@]} - 1; i >= 0; i--)); do  # what this run added to the host, newest first
    case ${created[i]} in
      user:*) userdel "${created[i]#user:}" ;;
      group:*) ! getent group "${created[i]#group:}" >/dev/null || groupdel "${created[i]#group:}" ;;
    esac
  done
  exec 9>&-
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
RABBITMQ_PASSWORD=x REDIS_PASSWORD=x FLOWER_BASIC_AUTH=x:x $COMPOSE -p "$DEPLOY_PROJECT" \
  -f docker-compose.yml -f docker-compose.rabbitmq.yml down -v --remove-orphans >/dev/null 2>&1 || true
lap "Docker ready ($COMPOSE)"

scripts/base-images.sh
# pip in the build reaches the index through host networking; a TLS-inspecting proxy's CA
# (Debian keeps locally added CAs in /usr/local/share/ca-certificates) goes to the build stage.
build_args=(--network host)
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
shopt -u nullglob
((${#local_cas[@]})) && build_args+=(--build-arg "BUILD_CA_CERTS=$(cat "${local_cas[@]}")")
say "building dormant:latest, dormant-redis:latest and dormant-rabbitmq:latest"
docker build -q "${build_args[@]}" -t dormant:latest . >/dev/null
docker build -q --network host -f Dockerfile.redis -t dormant-redis:latest . >/dev/null
images=(dormant:latest dormant-redis:latest)
if [[ " $BROKERS " == *" rabbitmq "* ]]; then
  docker build -q --network host -f Dockerfile.rabbitmq -t dormant-rabbitmq:latest . >/dev/null
  images+=(dormant-rabbitmq:latest)
fi
lap "images built"
for image in "${images[@]}" debian:bookworm-slim; do
  say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
done

# The libvirt socket the worker mounts, and the group it joins (see the header). On a shared
# machine libvirtd is everyone's: hold its lock while the stack depends on it, shared, as
# every test that uses libvirtd does, or exclusive to restart it (reconfigure). Nothing
# started from here may inherit fd 9.
libvirtd_lock() {  # -s | -x
  if ! flock -n "$1" 9; then
    say "waiting for /tmp/dormant-libvirtd.lock ($([[ $1 == -s ]] && echo "a test restarting libvirtd" || echo "tests using libvirtd") holds it)"
    flock -w 1800 "$1" 9 || die "waited 30 minutes for /tmp/dormant-libvirtd.lock"
  fi
  for _ in $(seq 120); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "libvirtd does not answer on qemu:///system"
}
exec 9>/tmp/dormant-libvirtd.lock
libvirtd_lock -s
getent group libvirt >/dev/null || { groupadd --system libvirt; created+=(group:libvirt); }
export LIBVIRT_GID LIBVIRT_SOCKET=/var/run/libvirt/libvirt-sock
LIBVIRT_GID=$(stat -c %g "$LIBVIRT_SOCKET")
worker_can_connect() {  # the worker image, uid 10001, in group LIBVIRT_GID, on LIBVIRT_SOCKET
  docker run --rm --group-add "$LIBVIRT_GID" -v "$LIBVIRT_SOCKET:/var/run/libvirt/libvirt-sock" \
    dormant:latest python -c 'import libvirt; libvirt.open("qemu:///system")' >/dev/null 2>&1
}
# direct: the socket already lets the worker in; reconfigure (CI: nobody else uses libvirtd):
# restart libvirtd configured as docs/production.md "The hypervisor host" says, restored at the end;
# proxy (a shared developer machine): the proxy socket of the header.
mode=${DORMANT_DEPLOY_LIBVIRT:-}
if [[ -z $mode ]]; then
  if worker_can_connect; then mode=direct
  elif [[ ${CI:-} == true ]]; then mode=reconfigure
  else mode=proxy; fi
fi
case $mode in
  direct)
    say "the worker mounts the host's libvirt socket (group $LIBVIRT_GID)" ;;
  reconfigure)
    say "configuring libvirtd for a non-root worker (user dormant 10001, unix_sock_group libvirt, auth_unix_rw none); restored at the end"
    getent group 10001 >/dev/null || { groupadd --system --gid 10001 dormant; created+=(group:dormant); }
    getent passwd 10001 >/dev/null || {
      useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dormant
      created+=(user:dormant); }
    { cat /etc/libvirt/libvirtd.conf 2>/dev/null || true
      printf '%s\n' 'unix_sock_group = "libvirt"' 'unix_sock_rw_perms = "0770"' 'auth_unix_rw = "none"'
    } >"$work/libvirtd.conf"
    libvirtd_lock -x
    reconfigured=1
    restart_libvirtd -f "$work/libvirtd.conf"
    LIBVIRT_GID=$(getent group libvirt | cut -d: -f3)
    worker_can_connect || die "the worker still cannot reach the reconfigured libvirtd"
    hang_pid=$(cat /var/run/libvirtd.pid) ;;
  proxy)
    LIBVIRT_GID=$(getent group libvirt | cut -d: -f3)
    LIBVIRT_SOCKET=$work/libvirt-sock
    say "libvirtd refuses non-root clients here (polkit without D-Bus): the worker gets a proxy socket, group libvirt, mode 0660"
    socat "UNIX-LISTEN:$LIBVIRT_SOCKET,fork,unlink-early,mode=660,user=root,group=$LIBVIRT_GID" \
          UNIX-CONNECT:/var/run/libvirt/libvirt-sock 9>&- 2>"$work/socat.log" &
    proxy_pid=$!
    hang_pid=$proxy_pid
    for _ in $(seq 50); do [[ -S $LIBVIRT_SOCKET ]] && break; sleep 0.1; done
    chmod 755 "$work" ;;
  *) die "DORMANT_DEPLOY_LIBVIRT must be direct, reconfigure or proxy" ;;
esac
# The checker SIGSTOPs this process for a moment: libvirt calls hang as with a hung libvirtd.
export DEPLOY_HANG_PID=${hang_pid:-}

export REDIS_PASSWORD FLOWER_BASIC_AUTH RABBITMQ_PASSWORD
REDIS_PASSWORD=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')
FLOWER_BASIC_AUTH=ops:$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(12))')
RABBITMQ_PASSWORD=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')
if [[ " $BROKERS " == *" redis "* ]]; then
  .venv/bin/python -m tests.deploy.check
  lap "deploy-test on Redis passed"
fi
if [[ " $BROKERS " == *" rabbitmq "* ]]; then
  .venv/bin/python -m tests.deploy.check_rabbitmq
  lap "deploy-test on RabbitMQ passed"
fi
