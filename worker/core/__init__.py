"""What every part shares: settings, the error tree, logs, metrics, input checks, guest states."""
