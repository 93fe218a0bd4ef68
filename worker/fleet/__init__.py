"""Which worker serves which host and instance, and recovering a dead worker's messages."""
