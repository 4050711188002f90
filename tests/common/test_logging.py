import json
import logging

from common.logging import JsonFormatter
from common.request_context import request_id


def test_one_json_object_per_line_with_job_id() -> None:
    formatter = JsonFormatter("scheduler")
    record = logging.LogRecord(
        "scheduler", logging.INFO, __file__, 1, "job %s", ("assigned",), None
    )
    record.job_id = "j-1"
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "job assigned"
    assert entry["job_id"] == "j-1"
    assert entry["service"] == "scheduler" and entry["level"] == "info"


def test_exceptions_stay_on_one_line() -> None:
    formatter = JsonFormatter("gateway")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert "ValueError: boom" in entry["exc"]


def test_request_id_when_serving_a_request() -> None:
    formatter = JsonFormatter("gateway")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "handled", (), None)
    assert "request_id" not in json.loads(formatter.format(record))
    token = request_id.set("req-7")
    try:
        entry = json.loads(formatter.format(record))
    finally:
        request_id.reset(token)
    assert entry["request_id"] == "req-7"
