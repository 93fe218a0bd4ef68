"""The state store: its Redis client (dormant's one Redis error boundary) and every key."""
