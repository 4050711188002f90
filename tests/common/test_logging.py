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


def test_a_service_line_on_stderr_after_configure(capfd) -> None:  # type: ignore[no-untyped-def]
    from decimal import Decimal

    from common.logging import configure_logging

    configure_logging("scheduler")
    # Without the caller's place, thread or process: nothing in a line needs them.
    assert logging._srcfile is None  # type: ignore[attr-defined]
    assert not (logging.logThreads or logging.logProcesses or logging.logMultiprocessing)
    logging.getLogger("scheduler").info(
        "job assigned", extra={"job_id": "j-2", "price": Decimal("1.5")}
    )
    [line] = capfd.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["msg"] == "job assigned" and entry["job_id"] == "j-2"
    assert entry["price"] == "1.5"  # not JSON itself: its str()
    assert entry["service"] == "scheduler" and entry["logger"] == "scheduler"
