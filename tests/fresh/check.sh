#!/usr/bin/env bash
# make fresh-test's checks, run inside its container (scripts/fresh-test.sh) from a fresh clone
# of dormant on a bare debian:bookworm-slim where only make and git were installed. It does what
# a newcomer does with the README and installs nothing itself: whatever is missing is set-up's
# fault, and shows here.
#   1. `make run`, in its own process group as in a terminal, reaches its banner, with the demo
#      fleet of tiny real guests (TCG here: no /dev/kvm in the container);
#   2. the README's first python snippet, extracted verbatim, answers: dormant-demo-web
#      suspended (and libvirt says so);
#   3. SIGINT to that group (Ctrl-C) stops it within a deadline: make ends on the interrupt,
#      no worker, beat, Flower, run.sh or QEMU process is left, the demo guests are removed;
#   4. the unit tests pass, run as the README says (`scripts/test.sh tests/unit -q`).
# Usage (in the clone): bash tests/fresh/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
T0=$SECONDS
out=$(mktemp -d /tmp/dormant-fresh.XXXXXX)
log=$out/make-run.log
say() { printf '\033[1m[fresh]\033[0m %s\n' "$*"; }
lap() { say "$1 ($((SECONDS - T0)) s since the start)"; }
fail() {
  printf '\033[31m[fresh] FAILED: %s\033[0m\n' "$1" >&2
  if [[ -s $log ]]; then
    echo "[fresh] --- make run's output (last 60 lines) ---" >&2
    tail -60 "$log" >&2
  fi
  exit 1
}
# Poll until a command succeeds; fail with MESSAGE after SECS. Usage: within SECS MESSAGE cmd...
within() {
  local secs=$1 message=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail "$message (not within ${secs} s)"
    sleep 1
  done
}

# Processes of make run that must not outlive it. Read from /proc: procps is set-up's to
# install, and a `ps | grep` would also find itself.
leftovers() {
  local proc cmd
  for proc in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
    case $cmd in
      *celery*|*flower*|*scripts/run.sh*|"make run"*|*qemu-system*) echo "${proc#/proc/} $cmd" ;;
    esac
  done
}

# 1. make run, as typed in a terminal: a job of its own (job control on), so it is its own
# process group, which Ctrl-C signals as a whole, and SIGINT is not ignored in it (without job
# control bash starts background commands with SIGINT ignored, and no trap could catch it).
say "make run (log: $log)"
set -m
make run </dev/null >"$log" 2>&1 &
make_pid=$!
set +m
banner() {
  kill -0 "$make_pid" 2>/dev/null || fail "make run ended before its banner"
  grep -q 'Ctrl-C stops' "$log"
}
within 1200 "make run's banner" banner
lap "make run printed its banner"
sed -n '/dormant is running on host/,/Ctrl-C stops/p' "$log"
grep -q 'Hypervisor: a demo fleet of tiny real guests' "$log" \
  || fail "make run did not run the demo fleet of real guests (its banner above says why)"

# 2. The README's first python snippet, byte for byte (as tests/integration/test_first_contact.py
# finds it: the first ```python block), run with the project's interpreter.
awk '/^```python$/ { found = 1; next } found && /^```/ { exit } found { print }' README.md \
  >"$out/snippet.py"
[[ -s $out/snippet.py ]] || fail "README.md has no python snippet"
grep -q 'redis://127.0.0.1:6379/0' "$out/snippet.py" || fail "the snippet no longer uses the default broker"
say "the README's first snippet:"
sed 's/^/    /' "$out/snippet.py"
answer=$(cd "$out" && timeout 120 "$repo/.venv/bin/python" snippet.py 2>&1) \
  || fail "the snippet failed: $answer"
say "its answer: $answer"
for expected in "'name': 'dormant-demo-web'" "'outcome': 'changed'" "'state_after': 'suspended'"; do
  [[ $answer == *"$expected"* ]] || fail "the snippet's answer lacks $expected"
done
state=$(virsh -c qemu:///system domstate dormant-demo-web --reason)
[[ $state == *"shut off (saved)"* ]] || fail "libvirt says dormant-demo-web is '$state', not saved"
lap "the snippet suspended dormant-demo-web (libvirt: $state)"

# 3. Ctrl-C.
kill -INT -- "-$make_pid"
stopped() { ! kill -0 "$make_pid" 2>/dev/null; }
within 120 "make run stopping after SIGINT" stopped
status=0
wait "$make_pid" || status=$?
# make re-raises the interrupt after its recipe stopped (run.sh exits 130 on SIGINT too).
((status == 130)) || fail "make run ended with status $status after SIGINT, not 130 (the interrupt)"
nothing_left() { [[ -z $(leftovers) ]]; }
within 30 "no process of make run left" nothing_left
if grep -q 'Traceback' "$log"; then fail "a traceback in make run's output"; fi
grep -q 'demo fleet removed' "$log" || fail "make run did not say it removed the demo fleet"
guests=$(virsh -c qemu:///system list --all --name | grep '^dormant-demo-' || true)
[[ -z $guests ]] || fail "demo guests left after Ctrl-C: $guests"
lap "Ctrl-C stopped make run (status $status), nothing left"

# 4. The unit tests, as the README runs a subset of the suite.
say "scripts/test.sh tests/unit -q"
scripts/test.sh tests/unit -q || fail "the unit tests failed"
lap "unit tests passed"
rm -rf "$out"
