"""Reclamation: activity samples, the idle policy, selection and safety, runs and their actions."""
