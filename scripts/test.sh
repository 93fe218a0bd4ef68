#!/usr/bin/env bash
# The whole suite, unit and integration, after the same set-up as `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pytest "$@"
