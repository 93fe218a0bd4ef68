#!/usr/bin/env bash
# Run dormant in the foreground: one Celery worker, Celery beat and Flower. Ctrl-C stops all.
# Hypervisor: DORMANT_LIBVIRT_URI, by default libvirt's embedded test driver with a demo fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export DORMANT_HOST=${DORMANT_HOST:-$(hostname)}
export DORMANT_LIBVIRT_URI=${DORMANT_LIBVIRT_URI:-test:///default}
mkdir -p .dormant && chmod 700 .dormant

# Flower always asks for a password: FLOWER_BASIC_AUTH=user:password, or one generated here.
if [[ -z ${FLOWER_BASIC_AUTH:-} ]]; then
  if [[ ! -s .dormant/flower-auth ]]; then
    (umask 077; echo "admin:$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(12))')" \
      > .dormant/flower-auth)
  fi
  FLOWER_BASIC_AUTH=$(cat .dormant/flower-auth)
  export FLOWER_BASIC_AUTH
fi
FLOWER_PORT=${FLOWER_PORT:-5555}
CELERY=.venv/bin/celery

pids=()
stop() {
  trap - INT TERM EXIT
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

$CELERY -A tasks worker --pool threads --concurrency "${DORMANT_CONCURRENCY:-8}" -l info &
pids+=($!)
$CELERY -A tasks beat -l info --schedule .dormant/celerybeat-schedule &
pids+=($!)
$CELERY -A tasks flower --address=127.0.0.1 --port="$FLOWER_PORT" &
pids+=($!)

cat <<MSG

  dormant is running on host '$DORMANT_HOST' with hypervisor $DORMANT_LIBVIRT_URI
  Flower:  http://127.0.0.1:$FLOWER_PORT   (user:password = ${FLOWER_BASIC_AUTH%%:*}:<see .dormant/flower-auth or FLOWER_BASIC_AUTH>)
  Try:     .venv/bin/dormant pause demo-web --wait && .venv/bin/dormant status
  Ctrl-C stops the worker, beat and Flower.

MSG
# Stop everything as soon as any one of the three exits.
wait -n "${pids[@]}"
