"""Reclamation tasks: sampling, the nightly run, restore and drain (to be written)."""
