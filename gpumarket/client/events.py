"""A job's live stream (`GET /v1/jobs/{id}/events`, Server-Sent Events), typed with the
shapes the gateway sends, and what a reconnecting reader needs to skip."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.messages import PullProgress
from gateway.schemas import LogLine, StreamEnd
from scheduler.schemas import JobOut

# How often a dropped event stream is reopened in a row before giving up.
STREAM_RECONNECTS = 5


class StatusEvent(BaseModel):
    """The job changed state (or attempt, waiting reason, exit code)."""

    kind: Literal["status"] = "status"
    job: JobOut


class LogEvent(LogLine):
    kind: Literal["log"] = "log"


class PullEvent(PullProgress):
    """The machine is pulling the job's image; bytes count the layers sized so far."""

    # A newer gateway's extra fields are no reason to fail (the wire contract forbids them).
    model_config = ConfigDict(extra="ignore")
    kind: Literal["pull"] = "pull"


class EndEvent(StreamEnd):
    """The job is over and every log line was sent; the stream closes."""

    kind: Literal["end"] = "end"


JobEvent = StatusEvent | LogEvent | PullEvent | EndEvent
_EVENTS: dict[str, type[LogEvent | PullEvent | EndEvent]] = {
    "log": LogEvent,
    "pull": PullEvent,
    "end": EndEvent,
}


def parse_event(event: str, data: str) -> JobEvent | None:
    """None for an event this client doesn't know (a newer gateway's)."""
    if event == "status":
        return StatusEvent(job=JobOut.model_validate_json(data))
    model = _EVENTS.get(event)
    return None if model is None else model.model_validate_json(data)


class Resume:
    """What a stream read across reconnections has already shown. The gateway replays a
    job's log from its first line on every connection, so after a dropped connection the
    lines already seen (counted per attempt) are skipped, and so is an unchanged status."""

    def __init__(self) -> None:
        self.lines_seen: dict[int, int] = {}
        self.replayed: dict[int, int] = {}
        self.last_status: JobOut | None = None
        self.drops = 0

    def connected(self) -> None:
        self.replayed = {}

    def accept(self, event: str, data: str) -> JobEvent | None:
        """The event to hand on, or None when it is unknown or was handed on before."""
        parsed = parse_event(event, data)
        if parsed is None or not self._fresh(parsed):
            return None
        self.drops = 0
        return parsed

    def dropped(self, error: Exception | None) -> float:
        """Seconds to wait before reconnecting; re-raises a transport error that keeps
        coming back."""
        if error is not None and self.drops >= STREAM_RECONNECTS:
            raise error
        self.drops += 1
        return min(0.25 * 2**self.drops, 5.0)

    def _fresh(self, event: JobEvent) -> bool:
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
    def state(job: JobOut) -> tuple[object, ...]:
        return (job.status, job.attempt, job.waiting_reason, job.exit_code)

    return state(a) == state(b)
