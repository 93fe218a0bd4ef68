"""The task contract and the Python client that callers (and the CLI) use."""
