"""Which worker serves which host and instance, what each broker needs (Redis or RabbitMQ),
and recovering a dead worker's messages where the broker does not."""
