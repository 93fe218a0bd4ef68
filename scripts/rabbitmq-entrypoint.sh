#!/bin/sh
# The RabbitMQ container's process 1 (Dockerfile.rabbitmq): the definitions dormant needs, then
# the node itself. RABBITMQ_PASSWORD (URL-safe, as it goes into amqp:// URLs) is the password of
# the user `dormant` on the virtual host `dormant`, whose default queue type is quorum: a plain
# Celery client that names only a queue then declares what dormant declared. Written at every
# start, so a changed password takes effect on the next restart; never on the data volume.
set -eu
: "${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD}"
umask 077
cat > /tmp/dormant-definitions.json <<JSON
{"vhosts": [{"name": "dormant", "metadata": {"default_queue_type": "quorum"}}],
 "users": [{"name": "dormant", "password": "$RABBITMQ_PASSWORD", "tags": ""}],
 "permissions": [{"user": "dormant", "vhost": "dormant",
                  "configure": ".*", "write": ".*", "read": ".*"}]}
JSON
unset RABBITMQ_PASSWORD
exec /usr/lib/rabbitmq/bin/rabbitmq-server
