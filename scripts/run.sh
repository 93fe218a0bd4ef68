#!/usr/bin/env bash
# Run dormant in the foreground: one Celery worker, Celery beat and Flower. Ctrl-C stops all.
#
# Without DORMANT_LIBVIRT_URI it is a demo: tiny real guests named dormant-demo-* on the local
# libvirtd (qemu:///system; worker/demo/bringup.py), created now and removed at exit, and reclamation on
# a compressed timescale (a sample every 10 s, a 3-minute window, a run every 4 minutes) so the
# idle guests are suspended within about five minutes. Where libvirtd cannot run, or runs but
# cannot start the demo guests (or with DORMANT_LIBVIRT_URI=test:///default), the same names on
# libvirt's in-process test driver (no CPU stats, so nothing is idle), and it says why. With any
# other DORMANT_LIBVIRT_URI it drives that hypervisor with your settings and no demo fleet.
# Every DORMANT_* variable is a setting (worker/core/settings.py); FLOWER_PORT and
# FLOWER_BASIC_AUTH are Flower's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-services
services_ok=1
scripts/services.sh || services_ok=0

export DORMANT_HOST=${DORMANT_HOST:-$(hostname)}
mkdir -p .dormant && chmod 700 .dormant
PY=.venv/bin/python
CELERY=.venv/bin/celery
say() { printf '\033[1m[run]\033[0m %s\n' "$*"; }

fallback_why="cannot run"  # what the banner says of the test driver
if [[ ${DORMANT_LIBVIRT_URI:-} == test:///default ]]; then
  mode=fake  # the fallback, chosen explicitly
elif [[ -n ${DORMANT_LIBVIRT_URI:-} ]]; then
  mode=yours
elif ((services_ok)) && timeout 20 virsh -c qemu:///system uri >/dev/null 2>&1; then
  mode=real
  export DORMANT_LIBVIRT_URI=qemu:///system
else
  mode=fake
  export DORMANT_LIBVIRT_URI=test:///default
  say "libvirtd cannot run here (see above): the demo falls back to libvirt's test driver"
fi

if [[ $mode != yours ]]; then
  # The demo's compressed timescale (each one can be overridden from the environment).
  export DORMANT_SAMPLE_INTERVAL=${DORMANT_SAMPLE_INTERVAL:-10}
  export DORMANT_IDLE_WINDOW=${DORMANT_IDLE_WINDOW:-180}
  export DORMANT_IDLE_MIN_SAMPLES=${DORMANT_IDLE_MIN_SAMPLES:-6}
  export DORMANT_RECLAIM_MIN_AGE=${DORMANT_RECLAIM_MIN_AGE:-60}
  export DORMANT_RECLAIM_EVERY=${DORMANT_RECLAIM_EVERY:-240}
  # Reclamation touches the demo guests only, never this host's other guests.
  export DORMANT_RECLAIM_SCOPE=${DORMANT_RECLAIM_SCOPE:-dormant-demo-*}
fi
export DORMANT_CONCURRENCY=${DORMANT_CONCURRENCY:-8}

if [[ $mode == real ]]; then
  # One demo fleet per libvirtd: the names are fixed. The lock dies with this shell (also on
  # SIGKILL), so guests left behind by a killed run are removed by the next one.
  exec 9>/tmp/dormant-demo.lock
  if ! flock -n 9; then
    echo "[run] another 'make run' is running its demo fleet on this machine's libvirtd" >&2
    echo "[run] (stop it first, or set DORMANT_LIBVIRT_URI to drive a hypervisor without the demo)" >&2
    exit 1
  fi
  if [[ -w /var/lib/libvirt ]]; then
    DEMO_DISKS=/var/lib/libvirt/images/dormant-demo
  else
    DEMO_DISKS=$PWD/.dormant/demo-disks
  fi
fi

# Flower always asks for a password: FLOWER_BASIC_AUTH=user:password, or one generated here.
if [[ -z ${FLOWER_BASIC_AUTH:-} ]]; then
  if [[ ! -s .dormant/flower-auth ]]; then
    (umask 077; echo "admin:$($PY -c 'import secrets; print(secrets.token_urlsafe(12))')" \
      > .dormant/flower-auth)
  fi
  FLOWER_BASIC_AUTH=$(cat .dormant/flower-auth)
  export FLOWER_BASIC_AUTH
fi
FLOWER_PORT=${FLOWER_PORT:-5555}

# Children get SIGTERM when this shell dies, even by SIGKILL (setpriv is in util-linux).
orphan_guard=()
command -v setpriv >/dev/null && orphan_guard=(setpriv --pdeathsig TERM --)

pids=()
stopping=0
stop() {
  ((stopping)) && return
  stopping=1
  trap '' INT TERM  # finish the clean-up even when Ctrl-C is pressed again
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  if [[ $mode == real ]]; then
    $PY -m worker.demo.bringup down --uri "$DORMANT_LIBVIRT_URI" --disks "$DEMO_DISKS" 9>&- || true
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $mode == real ]]; then
  # libvirtd can be up and still refuse guests (in an unprivileged container it could not set
  # its xattrs or cgroups): then the demo falls back, as where libvirtd cannot run at all.
  demo_ok=1
  $PY -m worker.demo.bringup up --uri "$DORMANT_LIBVIRT_URI" --disks "$DEMO_DISKS" \
    2>.dormant/demo-up.err 9>&- || demo_ok=0
  cat .dormant/demo-up.err >&2
  if ((!demo_ok)); then
    reason=$(grep -m1 '^error: ' .dormant/demo-up.err | sed 's/^error: //') || true
    say "libvirtd is up but could not start the demo guests: ${reason:-see the error above}"
    say "removing what was made, and falling back to libvirt's in-process test driver"
    $PY -m worker.demo.bringup down --uri "$DORMANT_LIBVIRT_URI" --disks "$DEMO_DISKS" 9>&- || true
    exec 9>&-  # the test driver's fleet lives in this run's worker only: no lock to hold
    mode=fake
    fallback_why="could not start the demo guests here (${reason:-see above})"
    export DORMANT_LIBVIRT_URI=test:///default
  fi
fi

# A fresh beat schedule: the demo's first reclamation run comes DORMANT_RECLAIM_EVERY after now.
rm -f .dormant/celerybeat-schedule*
node=dormant@$DORMANT_HOST
"${orphan_guard[@]}" $CELERY -A tasks worker --pool threads -n "$node" -l info 9>&- &
pids+=($!)
"${orphan_guard[@]}" $CELERY -A tasks beat -l info --schedule .dormant/celerybeat-schedule 9>&- &
pids+=($!)
"${orphan_guard[@]}" $CELERY -A tasks flower --address=127.0.0.1 --port="$FLOWER_PORT" 9>&- &
pids+=($!)

# The banner comes once the worker answers, so its own start-up output does not bury it.
"${orphan_guard[@]}" timeout 90 $PY - "$node" <<'PY' 9>&- || say "the worker has not answered yet; its log above says why"
import sys, time
from tasks.celery_app import app
deadline = time.monotonic() + 60
while not app.control.ping(destination=[sys.argv[1]], timeout=1):
    if time.monotonic() > deadline:
        sys.exit(1)
PY
broker=$($PY -c 'from worker.core.logs import redact_url; from worker.core.settings import get; print(redact_url(get().broker_url))' 2>/dev/null || echo "(see DORMANT_BROKER_URL)")
case $mode in
  real) what="a demo fleet of tiny real guests on this host's libvirtd ($DORMANT_LIBVIRT_URI)" ;;
  fake) what="libvirt's in-process test driver ($DORMANT_LIBVIRT_URI), the fallback where libvirtd
              $fallback_why: the demo fleet is simulated, transitions work, but its guests report
              no CPU time, so reclamation never finds them idle" ;;
  *) what="the hypervisor at $DORMANT_LIBVIRT_URI (your settings; no demo fleet)" ;;
esac
cat <<MSG

  dormant is running on host '$DORMANT_HOST' (queue dormant.$DORMANT_HOST and dormant.control)
  Hypervisor: $what
  Broker:     $broker
  Flower:     http://127.0.0.1:$FLOWER_PORT   (user:password = ${FLOWER_BASIC_AUTH%%:*}:<see .dormant/flower-auth or FLOWER_BASIC_AUTH>)
MSG
if [[ $mode != yours ]]; then
  cat <<MSG
  Demo:       dormant-demo-web, -db, -cache halt (idle); dormant-demo-batch spins (busy).
  Timescale:  a sample every ${DORMANT_SAMPLE_INTERVAL} s, idle over a ${DORMANT_IDLE_WINDOW} s window (${DORMANT_IDLE_MIN_SAMPLES}+ samples),
              guests at least ${DORMANT_RECLAIM_MIN_AGE} s old, a reclamation run every ${DORMANT_RECLAIM_EVERY} s
              (scope '${DORMANT_RECLAIM_SCOPE}'; in production: nightly, 24 h window, 1 day minimum age).
  Watch:      the first run starts ${DORMANT_RECLAIM_EVERY} s from now and suspends the idle guests; then
                .venv/bin/dormant reclaim report      # the last run: each guest's verdict and reason
                .venv/bin/dormant status              # states (virsh list --all shows them too)
              Flower > Tasks: dormant.reclaim, then one dormant.run_item per suspended guest.
  Try:        the README's first snippet suspends dormant-demo-web through dormant.control.
MSG
fi
cat <<MSG
  Ctrl-C stops the worker, beat and Flower$([[ $mode == real ]] && echo " and removes the demo guests").

MSG
# Stop everything as soon as any one of the three exits.
wait -n "${pids[@]}"
