"""The error tree's constructors: ``(message, **details)``, and a JSON round trip through
Celery's result backend rebuilds each error by name with its message."""

from __future__ import annotations

import pytest
from celery import Celery

from worker.core import errors

CLASSES = sorted((c for c in vars(errors).values()
                  if isinstance(c, type) and issubclass(c, errors.DormantError)),
                 key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_message_and_keyword_details(cls: type[errors.DormantError]) -> None:
    exc = cls("instance vm-1 is locked", instance="vm-1", ttl_ms=1500)
    assert str(exc) == exc.message == "instance vm-1 is locked"
    assert exc.details == {"instance": "vm-1", "ttl_ms": 1500}
    assert exc.args == ("instance vm-1 is locked",)
    assert cls("plain").details == {}


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_json_round_trip_through_celery(cls: type[errors.DormantError]) -> None:
    app = Celery("errors-test", backend="cache+memory://", set_as_current=False)
    app.conf.result_serializer = "json"
    backend = app.backend
    sent = backend.prepare_exception(cls("it broke", instance="vm-1"), "json")
    back = backend.exception_to_python(backend.decode(backend.encode(sent)))
    assert type(back) is cls and str(back) == "it broke"
    assert isinstance(back, errors.TransientError) == issubclass(cls, errors.TransientError)
