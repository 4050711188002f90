"""What the daemon tells the platform about a job attempt: events and log lines on
JetStream, image pull progress on core NATS."""

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from common.messages import EventType, JobEvent, LogBatch, PullProgress
from common.subjects import event_subject, log_subject, msg_id, pull_subject

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        js: JetStreamContext,
        provider_id: str,
        *,
        nc: NatsClient,
        event_retry_for_s: float = 120.0,
        ack_timeout_s: float = 5.0,
    ) -> None:
        self.js = js
        self.nc = nc
        self.provider_id = provider_id
        self.event_retry_for_s = event_retry_for_s
        self.ack_timeout_s = ack_timeout_s

    async def _publish(
        self,
        subject: str,
        payload: bytes,
        dedup_id: str,
        retry_for_s: float,
        what: str,
        job: dict[str, object],
    ) -> bool:
        """Publishes until JetStream acks or `retry_for_s` passes; the Nats-Msg-Id makes
        a retry after a lost ack harmless."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = 0.2
        while True:
            try:
                await self.js.publish(
                    subject,
                    payload,
                    timeout=self.ack_timeout_s,
                    headers={"Nats-Msg-Id": dedup_id},
                )
                return True
            except (NatsError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if loop.time() + delay > deadline:
                    log.error("could not publish %s: %s", what, problem, extra=job)
                    return False
                log.warning("publishing %s failed (%s), retrying", what, problem, extra=job)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def event(
        self, job_id: str, attempt: int, type_: EventType, **fields: Any
    ) -> JobEvent | None:
        """Publishes one lifecycle event; returns it, or None when NATS stayed unreachable."""
        event = JobEvent(
            job_id=job_id,
            attempt=attempt,
            provider_id=self.provider_id,
            type=type_,
            at=datetime.now(UTC),
            **fields,
        )
        ok = await self._publish(
            event_subject(self.provider_id, job_id),
            event.model_dump_json().encode(),
            msg_id(job_id, attempt, type_),
            self.event_retry_for_s,
            f"{type_} event",
            {"job_id": job_id, "attempt": attempt},
        )
        return event if ok else None

    async def logs(self, batch: LogBatch) -> bool:
        # Log lines are also in the uploaded log file, so a batch is not worth a long wait.
        return await self._publish(
            log_subject(self.provider_id, batch.job_id),
            batch.model_dump_json().encode(),
            msg_id(batch.job_id, batch.attempt, f"log-{batch.seq}"),
            retry_for_s=10.0,
            what=f"log batch {batch.seq}",
            job={"job_id": batch.job_id, "attempt": batch.attempt},
        )

    async def pull_progress(self, progress: PullProgress) -> None:
        """Fire and forget (see common.subjects.pull_subject): the next update replaces a
        lost one, so a NATS problem is only logged."""
        try:
            await self.nc.publish(
                pull_subject(self.provider_id, progress.job_id),
                progress.model_dump_json().encode(),
            )
        except (NatsError, OSError) as exc:
            log.debug(
                "could not publish pull progress: %s",
                exc,
                extra={"job_id": progress.job_id, "attempt": progress.attempt},
            )
