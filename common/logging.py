"""Structured logs: one JSON object per line, with the job id and request id where there are."""

import json
import logging
import sys
from datetime import UTC, datetime

from common.request_context import request_id

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}
# One encoder for every line: json.dumps with `default` builds a new one each call.
_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rid := request_id.get()) is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encode(entry)


def configure_logging(service: str, level: str = "INFO") -> None:
    # What a record would collect and these lines never show: the caller's file and line
    # (a walk up the stack), the thread, the process id (a system call) and name. The
    # scheduler logs a line per job placed; these were about half of its logging's CPU,
    # and its logging a tenth of its CPU (py-spy, BENCHMARKS.md). Python's logging
    # HOWTO, "Optimization", names these switches.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn installs its own handlers; route its records through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # One line per outgoing request is noise; failures are logged where they matter.
    logging.getLogger("httpx").setLevel(logging.WARNING)
