#!/usr/bin/env bash
# The whole suite, unit and integration, after the same set-up as `make run` (plus Debian's
# rabbitmq-server: the suite runs some tests on a private RabbitMQ node too).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-rabbitmq
exec .venv/bin/pytest "$@"
