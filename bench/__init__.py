"""Benchmarks (not tests): run them with ``.venv/bin/python -m bench.<name>``."""
