"""The Celery side of dormant: ``celery -A tasks worker|beat|flower``.

Task bodies are thin: parse arguments, call into ``worker/``, return JSON.
"""

from tasks.celery_app import app

__all__ = ["app"]
