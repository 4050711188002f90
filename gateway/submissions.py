"""Group commit of submissions: single jobs and job arrays.

Each POST /v1/jobs used to pay for its own transaction: a pool checkout, the account
lock, the job insert, the hold's transfer and entries, the commit, and a JetStream
publish. Under load that is most of the gateway's and Postgres' work per job. Here the
requests that arrive while one transaction is in flight wait for the next one and share
it: one lock query for all their owners, one multi-row insert, one commit, one wake-up.
No request waits for a timer: a lone request is committed at once, as before.

Arrays share it too: every transaction that moves a requester's money locks that
requester's two account rows until it commits, so 32 arrays in flight at once were 32
transactions queued on one lock, with the scheduler's settlements waiting behind them.

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

# Jobs committed together at most (a submission is never split; an array of more jobs
# than this goes alone): a bigger batch holds its first request longer.
MAX_BATCH = 2_000


@dataclass
class _Waiting:
    submission: job_store.Submission
    answer: asyncio.Future[list[Job]] = field(
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
        [job] = await self._submit(job_store.Submission(owner_id, [spec]))
        return job

    async def submit_array(self, owner_id: str, specs: list[JobSpec]) -> list[Job]:
        """A job array's jobs as committed, all or none."""
        return await self._submit(job_store.Submission(owner_id, specs, array=True))

    async def _submit(self, submission: job_store.Submission) -> list[Job]:
        if self._task is None or self._task.done() or self._stopping:
            raise ServiceUnavailable("the gateway is not taking submissions")
        waiting = _Waiting(submission)
        self._waiting.append(waiting)
        self._arrived.set()
        # A caller that goes away leaves its submission to be committed all the same:
        # the jobs may already be in the transaction under way.
        return await asyncio.shield(waiting.answer)

    def _next_batch(self) -> list[_Waiting]:
        """The first waiting submissions, up to max_batch jobs (at least one submission)."""
        count = jobs = 0
        for waiting in self._waiting:
            jobs += len(waiting.submission.specs)
            if count and jobs > self.max_batch:
                break
            count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        return batch

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if self._stopping:
                return
            batch = self._next_batch()
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
        created = [job for r in results if isinstance(r, list) for job in r]
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

    async def _commit(self, batch: list[_Waiting]) -> list[list[Job] | InsufficientFunds]:
        async with self.db.begin() as session:
            return await job_store.create_submissions(
                session, [w.submission for w in batch], self.billing
            )


def _answer(waiting: _Waiting, result: list[Job] | Exception) -> None:
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
