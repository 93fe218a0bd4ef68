"""One retry policy for every task, from the settings: transient errors only, the settings'
backoff, cap and attempt count -- no task carries numbers of its own."""

from __future__ import annotations

from typing import Any

import pytest

from tasks import app
from worker.api import contract
from worker.core import settings
from worker.core.errors import TransientError

app.loader.import_default_modules()  # the worker's task modules (app.conf.include)
TASKS = sorted(name for name in app.tasks if name.startswith("dormant."))


def test_every_contract_task_is_registered() -> None:
    assert set(TASKS) == set(contract.TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_retries_transient_errors_by_the_settings(name: str) -> None:
    task: Any = app.tasks[name]
    s = settings.get()
    assert task.autoretry_for == (TransientError,)
    assert (task.max_retries, task.retry_backoff, task.retry_backoff_max) == (
        s.max_retries, s.retry_backoff, s.retry_backoff_max)
    assert task.retry_jitter and task.acks_late
