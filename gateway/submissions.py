"""Group commit of single-job submissions.

Each POST /v1/jobs used to pay for its own transaction: a pool checkout, the account
lock, the job insert, the hold's transfer and entries, the commit, and a JetStream
publish. Under load that is most of the gateway's and Postgres' work per job. Here the
requests that arrive while one transaction is in flight wait for the next one and share
it: one lock query for all their owners, one multi-row insert, one commit, one wake-up.
No request waits for a timer: a lone request is committed at once, as before.

Each request keeps its own answer. A requester whose credits don't cover a job gets
its 402 alone (decided in arrival order, as one-by-one submissions would be), and a
batch that fails as a whole is retried one submission at a time, so a submission that
breaks something fails only itself. A job is in Postgres before its 202, as always.
"""

import asyncio
import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing.holds import InsufficientFunds
from billing.settings import BillingSettings
from common import subjects
from common.messages import JobSubmitted
from gateway.clients import ServiceUnavailable
from scheduler import job_store
from scheduler.models import Job
from scheduler.schemas import JobSpec

log = logging.getLogger(__name__)

# Submissions committed together at most: a bigger batch holds its first request longer.
MAX_BATCH = 200


@dataclass
class _Waiting:
    owner_id: str
    spec: JobSpec
    answer: asyncio.Future[Job] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SubmissionBatcher:
    """Commits the submissions handed to `submit` in batches, one transaction each."""

    def __init__(
        self,
        db: async_sessionmaker,
        js: JetStreamContext,
        billing: BillingSettings,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.db = db
        self.js = js
        self.billing = billing
        self.max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._wakes: set[asyncio.Task] = set()
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="submission-batcher")

    async def stop(self) -> None:
        """Stops taking submissions: the batch under way is committed and answered, those
        still waiting are answered 503."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        # Wake-ups still waiting on NATS are dropped: the scheduler's periodic pass finds
        # the jobs in Postgres anyway.
        for wake in self._wakes:
            wake.cancel()
        await asyncio.gather(*self._wakes, return_exceptions=True)
        for waiting in self._waiting:
            if not waiting.answer.done():
                waiting.answer.set_exception(ServiceUnavailable("the gateway is shutting down"))
        self._waiting.clear()

    async def submit(self, owner_id: str, spec: JobSpec) -> Job:
        """The job as committed, or the submission's own error (InsufficientFunds...)."""
        if self._task is None or self._task.done() or self._stopping:
            raise ServiceUnavailable("the gateway is not taking submissions")
        waiting = _Waiting(owner_id, spec)
        self._waiting.append(waiting)
        self._arrived.set()
        # A caller that goes away leaves its submission to be committed all the same:
        # the job may already be in the transaction under way.
        return await asyncio.shield(waiting.answer)

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if self._stopping:
                return
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            if not self._waiting:
                self._arrived.clear()
            if batch:
                await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Waiting]) -> None:
        try:
            results = await self._commit(batch)
        except Exception as exc:
            if len(batch) == 1:
                _answer(batch[0], exc)
                return
            log.warning(
                "a batch of submissions failed; committing them one by one",
                extra={"count": len(batch), "error": str(exc)},
            )
            for waiting in batch:
                await self._commit_batch([waiting])
            return
        for waiting, result in zip(batch, results, strict=True):
            _answer(waiting, result)
        created = [r for r in results if isinstance(r, Job)]
        if created:
            first = created[0]
            # Not awaited: the next batch's commit must not wait on NATS (a publish to
            # a NATS that is down waits out its timeout; the jobs are safe already).
            wake = asyncio.create_task(
                wake_scheduler(
                    self.js,
                    first.id,
                    subjects.msg_id(first.id, first.attempt, "submitted"),
                    {"job_id": first.id, "count": len(created)},
                )
            )
            self._wakes.add(wake)
            wake.add_done_callback(self._wakes.discard)

    async def _commit(self, batch: list[_Waiting]) -> list[Job | InsufficientFunds]:
        async with self.db.begin() as session:
            return await job_store.create_jobs(
                session, [(w.owner_id, w.spec) for w in batch], self.billing
            )


def _answer(waiting: _Waiting, result: Job | Exception) -> None:
    if waiting.answer.done():
        return
    if isinstance(result, Exception):
        waiting.answer.set_exception(result)
    else:
        waiting.answer.set_result(result)


async def wake_scheduler(js: JetStreamContext, job_id: str, msg_id: str, extra: dict) -> None:
    """A wake-up for the scheduler, which reads the queued jobs from Postgres: one per
    batch of submissions or job array is enough to make it look now."""
    try:
        await js.publish(
            subjects.JOB_SUBMITTED,
            JobSubmitted(job_id=job_id, attempt=0).model_dump_json().encode(),
            headers={"Nats-Msg-Id": msg_id},
        )
    except Exception as exc:
        # The jobs are safe in Postgres; the scheduler's next pass over queued jobs finds them.
        log.warning(
            "publish failed; the scheduler will find the jobs by its next pass",
            extra={**extra, "error": str(exc)},
        )
