"""Log lines: JSON with the transition fields when asked, and never a URL password."""

from __future__ import annotations

import io
import json
import logging

from worker.core import logs


def _record(msg: str, *args: object, fields: dict | None = None,
            exc: BaseException | None = None) -> logging.LogRecord:
    record = logging.LogRecord("dormant.transition", logging.INFO, __file__, 1, msg, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    if fields is not None:
        record.dormant = fields
    return record


def test_json_formatter_lifts_transition_fields_to_the_top_level():
    fields = {"instance": "0b9c1a52-6e9f-4d2b-9a43-5b7f6c1d2e3f", "request_id": "r-1",
              "task_id": "t-1", "host": "kvm1", "attempts": 2}
    line = logs.JsonFormatter().format(_record("pause %s: %s", "demo-web", "changed",
                                               fields=fields))
    doc = json.loads(line)
    assert doc["message"] == "pause demo-web: changed"
    assert doc["level"] == "info" and doc["logger"] == "dormant.transition"
    assert {k: doc[k] for k in fields} == fields


def test_fields_never_override_the_envelope():
    doc = json.loads(logs.JsonFormatter().format(_record("x", fields={"message": "forged"})))
    assert doc["message"] == "x"


def test_url_passwords_are_masked_in_messages_fields_and_tracebacks():
    url = "redis://:hunter2@redis:6379/0"
    try:
        raise ConnectionError(f"Error connecting to {url}")
    except ConnectionError as exc:
        record = _record("cannot reach %s", url, fields={"broker": url}, exc=exc)
    for formatter in (logs.JsonFormatter(), logs.PlainFormatter(logs.PLAIN_FORMAT)):
        line = formatter.format(record)
        assert "hunter2" not in line
        assert "redis://:***@redis:6379/0" in line


def test_redact_keeps_urls_without_passwords_and_user_names():
    assert logs.redact("qemu:///system and http://h:5555/x@y") == \
        "qemu:///system and http://h:5555/x@y"
    assert logs.redact("amqp://guest:pw@mq//") == "amqp://guest:***@mq//"
    assert logs.redact_url("rediss://user:pw@h:6380/0") == "rediss://user:***@h:6380/0"


def test_configure_sets_the_formatter_on_every_handler_of_the_logger():
    stream = io.StringIO()
    logger = logging.getLogger("test-configure-target")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    old_level = logging.getLogger("dormant").level
    try:
        logs.configure(logger, json_lines=True, level="debug")
        logger.warning("cannot reach %s", "redis://:s3cret@x:1/0",
                       extra={"dormant": {"task_id": "t-9"}})
    finally:
        logger.removeHandler(handler)
        level_set = logging.getLogger("dormant").level
        logging.getLogger("dormant").setLevel(old_level)
    doc = json.loads(stream.getvalue())
    assert doc["task_id"] == "t-9"
    assert "s3cret" not in doc["message"]
    assert level_set == logging.DEBUG


def test_every_logger_is_under_dormant_so_the_log_level_setting_reaches_it() -> None:
    """DORMANT_LOG_LEVEL sets the "dormant" logger; a module logging under ``__name__``
    ("worker.transition.guards") would escape it."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[3]
    names = {}
    for path in [*root.glob("worker/**/*.py"), *root.glob("tasks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger" and node.args):  # () = the root, configured
                arg = node.args[0]
                names[f"{path.relative_to(root)}:{node.lineno}"] = (
                    arg.value if isinstance(arg, ast.Constant) else ast.dump(arg))
    assert names  # the scan found the loggers
    outside = {where: name for where, name in names.items()
               if not (name == "dormant" or str(name).startswith("dormant."))}
    assert outside == {}
