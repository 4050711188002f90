"""Job submission, live event streams and logs, on top of the scheduler's job store."""

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.errors import Invalid
from common.ids import is_uuid
from common.messages import LogBatch, PullProgress
from gateway.clients import ServiceClient, ServiceUnavailable, UpstreamError
from gateway.schemas import JobArrayOut, JobArrayRequest, LogLine, StreamEnd
from gateway.storage import UsageCache, presign
from gateway.submissions import SubmissionBatcher
from scheduler import job_store, states
from scheduler.models import Job
from scheduler.schemas import JobOut, JobSpec
from storage_service.quota import over_quota

log = logging.getLogger(__name__)
# Per gateway process: what storage said of a user's usage in the last few seconds.
_usage = UsageCache()


# How many input files one submission looks up at storage_service at a time.
FILE_CHECKS_IN_FLIGHT = 8


async def submit_job(
    batcher: SubmissionBatcher, storage: ServiceClient, owner_id: str, spec: JobSpec
) -> JobOut:
    """Stores the job with its hold (it can't be lost once we answer 202), committed
    together with the other submissions of the moment, and wakes the scheduler. Credits
    that don't cover the hold: 402, and nothing is stored."""
    await _check_storage_quota(storage, owner_id)
    await _check_inputs(storage, owner_id, [("", spec)])
    job = await batcher.submit(owner_id, spec)
    log.info("job submitted", extra={"job_id": job.id, "owner_id": owner_id})
    return job_store.new_job_out(job)


async def submit_array(
    batcher: SubmissionBatcher, storage: ServiceClient, owner_id: str, body: JobArrayRequest
) -> JobArrayOut:
    """Stores a whole job array with its holds or nothing (committed together with the
    other submissions of the moment), and wakes the scheduler."""
    specs, named = _array_specs(body)
    await _check_storage_quota(storage, owner_id)
    await _check_inputs(storage, owner_id, named)
    created = await batcher.submit_array(owner_id, specs)
    array_id = created[0].array_id
    assert array_id is not None
    log.info(
        "job array submitted",
        extra={"array_id": array_id, "count": len(created), "owner_id": owner_id},
    )
    return JobArrayOut(
        array_id=array_id, count=len(created), jobs=[job_store.new_job_out(j) for j in created]
    )


def _array_specs(body: JobArrayRequest) -> tuple[list[JobSpec], list[tuple[str, JobSpec]]]:
    """The array's specs, and the distinct specs with the field prefix their errors get."""
    if body.jobs is not None:
        if body.template is not None:
            raise Invalid("give either jobs, or template with count, not both", field="template")
        if body.count is not None:
            raise Invalid("count goes with template, not with jobs", field="count")
        return body.jobs, [(f"jobs.{i}.", spec) for i, spec in enumerate(body.jobs)]
    if body.template is None:
        field = "template" if body.count is not None else "jobs"
        raise Invalid("give either jobs, or template with count", field=field)
    if body.count is None:
        raise Invalid("template needs a count", field="count")
    return [body.template] * body.count, [("template.", body.template)]


async def _check_storage_quota(storage: ServiceClient, owner_id: str) -> None:
    """A user already past the storage quota (their outputs may take them there) submits
    nothing until files are deleted or expire: 403 saying so."""
    refusal = over_quota(await _usage.get(storage, owner_id))
    if refusal is not None:
        raise refusal


async def _check_inputs(
    storage: ServiceClient, owner_id: str, specs: list[tuple[str, JobSpec]]
) -> None:
    """Every input file exists and is the owner's: each distinct file is asked for once.
    A bad one is a 422 naming its first use (`<prefix>inputs.<i>.file_id`)."""
    first_use: dict[str, str] = {}
    for prefix, spec in specs:
        for i, item in enumerate(spec.inputs):
            field = f"{prefix}inputs.{i}.file_id"
            if not is_uuid(item.file_id):
                raise Invalid(f"file {item.file_id} not found", field=field)
            first_use.setdefault(item.file_id, field)
    if not first_use:
        return
    in_flight = asyncio.Semaphore(FILE_CHECKS_IN_FLIGHT)

    async def exists(file_id: str) -> bool:
        async with in_flight:
            try:
                await storage.request(
                    "GET", f"/internal/files/{file_id}", params={"owner_id": owner_id}
                )
            except UpstreamError as exc:
                if exc.status_code == 404:
                    return False
                raise
        return True

    found = await asyncio.gather(*(exists(file_id) for file_id in first_use))
    for (file_id, field), ok in zip(first_use.items(), found, strict=True):
        if not ok:
            raise Invalid(f"file {file_id} not found", field=field)


async def _read_job(db: async_sessionmaker, job_id: str, owner_id: str | None) -> Job:
    async with db() as session:
        return await job_store.get_job(session, job_id, owner_id)


async def stream_events(
    db: async_sessionmaker,
    js: JetStreamContext,
    nc: NatsClient,
    job_id: str,
    owner_id: str | None,
    poll_s: float,
) -> AsyncIterator[dict]:
    """SSE events for one job: `status` on every state change, `pull` while its machine
    pulls its image, `log` per log line, live.

    Status comes from Postgres (the truth), log lines from the LOGS stream from the
    beginning, pull progress from core NATS as it happens (none is stored: a follower
    sees the pulls under way from when it connected). The stream ends after the job is
    terminal and its last lines were sent.
    """
    job = await _read_job(db, job_id, owner_id)
    wanted = job.id
    pulls: list[PullProgress] = []

    async def on_pull(msg: Msg) -> None:
        try:
            progress = PullProgress.model_validate_json(msg.data)
        except ValueError:
            return
        if progress.job_id == wanted:
            pulls.append(progress)

    pull_sub = await nc.subscribe(subjects.job_pulls_filter(job.id), cb=on_pull)
    sub = await js.subscribe(
        subjects.job_logs_filter(job.id), ordered_consumer=True, stream=subjects.LOGS_STREAM
    )
    last_status: tuple | None = None
    try:
        while True:
            job = await _read_job(db, job_id, owner_id)
            status = (job.status, job.attempt, job.waiting_reason, job.exit_code)
            if status != last_status:
                last_status = status
                async with db() as session:
                    [out] = await job_store.jobs_out(session, [job])
                yield {"event": "status", "data": out.model_dump_json()}
            drained = await _drain_logs(sub, poll_s)
            # A pull comes before the container's output, so its progress goes first.
            arrived, pulls[:] = pulls[:], []
            for progress in arrived:
                yield {"event": "pull", "data": progress.model_dump_json()}
            for batch in drained:
                for line in batch.lines:
                    yield {
                        "event": "log",
                        "data": LogLine(attempt=batch.attempt, line=line).model_dump_json(),
                    }
            if job.status in states.TERMINAL and job.finished_at is not None and not drained:
                yield {"event": "end", "data": StreamEnd(status=job.status).model_dump_json()}
                return
    finally:
        await sub.unsubscribe()
        await pull_sub.unsubscribe()


async def _drain_logs(sub, wait_s: float) -> list[LogBatch]:  # type: ignore[no-untyped-def]
    batches: list[LogBatch] = []
    timeout = wait_s
    while True:
        try:
            msg = await sub.next_msg(timeout=timeout)
        except (TimeoutError, NatsTimeoutError):
            return batches
        try:
            batches.append(LogBatch.model_validate_json(msg.data))
        except ValueError:
            continue
        timeout = 0.05  # keep draining what is already there, without waiting long


async def read_logs(
    db: async_sessionmaker,
    js: JetStreamContext,
    storage: ServiceClient,
    job_id: str,
    owner_id: str | None,
) -> str:
    """The current attempt's log: the stored file once the job ended, else the live lines."""
    job = await _read_job(db, job_id, owner_id)
    if job.finished_at is not None and job.provider_id is not None:
        text = await _stored_log(storage, job)
        if text is not None:
            return text
    sub = await js.subscribe(
        subjects.job_logs_filter(job.id), ordered_consumer=True, stream=subjects.LOGS_STREAM
    )
    try:
        batches = await _drain_logs(sub, 0.3)
    finally:
        await sub.unsubscribe()
    return "".join(line + "\n" for b in batches if b.attempt == job.attempt for line in b.lines)


async def _stored_log(storage: ServiceClient, job: Job) -> str | None:
    [url], _ = await presign(storage, "logs", [job_store.log_key(job.id, job.attempt)], "GET")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(url)
    except httpx.TransportError as exc:
        raise ServiceUnavailable(f"object storage is unreachable: {exc}") from exc
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise ServiceUnavailable(f"object storage answered {response.status_code}")
    return response.text


async def output_urls(
    db: async_sessionmaker, storage: ServiceClient, job_id: str, owner_id: str | None
) -> list[dict]:
    async with db() as session:
        job = await job_store.get_job(session, job_id, owner_id)
        outputs = await job_store.list_outputs(session, job)
    keys = [job_store.output_key(job.id, out.attempt, out.path) for out in outputs]
    urls, expires_at = await presign(storage, "outputs", keys, "GET")
    return [
        {
            "path": out.path,
            "size": out.size,
            "sha256": out.sha256,
            "download_url": url,
            "expires_at": expires_at,
        }
        for out, url in zip(outputs, urls, strict=True)
    ]


async def job_for_agent(db: async_sessionmaker, job_id: str, provider_id: str, attempt: int) -> Job:
    """The job, if this attempt was sent to this provider; anything else is 'not found'."""
    async with db() as session:
        return await job_store.get_task(session, job_id, provider_id, attempt)
