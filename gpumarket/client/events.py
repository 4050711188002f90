"""A job's live stream (`GET /v1/jobs/{id}/events`, Server-Sent Events), typed."""

import json
from typing import Literal

from pydantic import BaseModel

from scheduler.schemas import JobOut


class StatusEvent(BaseModel):
    """The job changed state (or attempt, waiting reason, exit code)."""

    kind: Literal["status"] = "status"
    job: JobOut


class LogEvent(BaseModel):
    kind: Literal["log"] = "log"
    attempt: int
    line: str


class PullEvent(BaseModel):
    """The machine is pulling the job's image; bytes count the layers sized so far."""

    kind: Literal["pull"] = "pull"
    attempt: int
    image: str
    status: str
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


class EndEvent(BaseModel):
    """The job is over and every log line was sent; the stream closes."""

    kind: Literal["end"] = "end"
    status: str


JobEvent = StatusEvent | LogEvent | PullEvent | EndEvent


def parse_event(event: str, data: str) -> JobEvent | None:
    """None for an event this client doesn't know (a newer gateway's)."""
    if event == "status":
        return StatusEvent(job=JobOut.model_validate_json(data))
    if event == "log":
        return LogEvent.model_validate_json(data)
    if event == "pull":
        return PullEvent.model_validate_json(data)
    if event == "end":
        return EndEvent.model_validate(json.loads(data))
    return None


class Resume:
    """What a reconnected stream has already shown. The gateway replays a job's log from
    its first line on every connection, so after a dropped connection the lines already
    seen (counted per attempt) are skipped, and so is an unchanged status."""

    def __init__(self) -> None:
        self.lines_seen: dict[int, int] = {}
        self.replayed: dict[int, int] = {}
        self.last_status: JobOut | None = None

    def reconnected(self) -> None:
        self.replayed = {}

    def fresh(self, event: JobEvent) -> bool:
        if isinstance(event, LogEvent):
            replayed = self.replayed.get(event.attempt, 0) + 1
            self.replayed[event.attempt] = replayed
            if replayed <= self.lines_seen.get(event.attempt, 0):
                return False
            self.lines_seen[event.attempt] = replayed
            return True
        if isinstance(event, StatusEvent):
            if self.last_status is not None and _same_state(self.last_status, event.job):
                return False
            self.last_status = event.job
        return True


def _same_state(a: JobOut, b: JobOut) -> bool:
    return (a.status, a.attempt, a.waiting_reason, a.exit_code) == (
        b.status,
        b.attempt,
        b.waiting_reason,
        b.exit_code,
    )
