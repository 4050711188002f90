"""A job attempt's data: its inputs fetched (and checked against their sha256) before the
container starts, its outputs and log uploaded after it ends, all through presigned URLs
(the daemon holds no storage keys). Big outputs go up in parts, each with its own
retries, a few at a time, read from the file as they go."""

import asyncio
import logging
import os
from pathlib import Path

from common.messages import OutputFile, TaskAssignment
from provider_daemon.agent_api import AgentApi, MultipartTarget
from provider_daemon.errors import InfrastructureError
from provider_daemon.workspace import JobDir, safe_input_path, scan_outputs

log = logging.getLogger(__name__)

# Parts of one file in flight at once: enough to fill a link, few enough for a small machine.
PART_CONCURRENCY = 4


async def fetch_inputs(agent: AgentApi, task: TaskAssignment, job: JobDir) -> int:
    """Downloads the task's inputs under job.inputs; returns how many files. An input
    whose bytes don't match its sha256 (after retries) fails the attempt."""
    if not task.inputs:
        return 0
    files = await agent.list_inputs(task.job_id, task.attempt)
    for item in files:
        dest = safe_input_path(job.inputs, item.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await agent.download(item.download_url, dest, item.size, item.sha256, name=item.path)
    return len(files)


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part: part_size bytes each, the last one what is left."""
    if part_size <= 0:
        raise ValueError("part_size must be positive")
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]


async def _send_parts(
    agent: AgentApi, src: Path, path: str, plan: MultipartTarget, ranges: list[tuple[int, int]]
) -> list[str]:
    slots = asyncio.Semaphore(PART_CONCURRENCY)

    async def send(number: int, offset: int, length: int, url: str) -> str:
        async with slots:
            what = f"uploading {path} part {number}/{len(ranges)}"
            return await agent.upload_part(url, src, offset, length, what)

    tasks = [
        asyncio.create_task(send(n, offset, length, url))
        for n, ((offset, length), url) in enumerate(zip(ranges, plan.part_urls, strict=True), 1)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # The first failure ends the upload: the other parts need not go on.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def upload_in_parts(
    agent: AgentApi, task: TaskAssignment, file: OutputFile, src: Path, plan: MultipartTarget
) -> None:
    """Sends the parts, then has the platform join them; a failed upload is aborted so
    its parts don't linger in storage."""
    ranges = part_ranges(file.size, plan.part_size)
    if len(ranges) != len(plan.part_urls):
        raise InfrastructureError(
            f"output {file.path!r}: {len(plan.part_urls)} part URLs for {len(ranges)} parts"
        )
    try:
        etags = await _send_parts(agent, src, file.path, plan, ranges)
        size = await agent.complete_upload(
            task.job_id, task.attempt, file.path, plan.upload_id, etags
        )
        if size != file.size:
            raise InfrastructureError(
                f"output {file.path!r}: storage holds {size} bytes, the file has {file.size}"
            )
    except BaseException:
        try:
            await agent.abort_upload(task.job_id, task.attempt, file.path, plan.upload_id)
        except Exception as exc:
            # Storage's sweeper aborts abandoned uploads; the failure above is what matters.
            log.warning(
                "could not abort the upload of %s: %s",
                file.path,
                exc,
                extra={"job_id": task.job_id},
            )
        raise


async def upload_results(agent: AgentApi, task: TaskAssignment, job: JobDir) -> list[OutputFile]:
    """Uploads every regular file under job.outputs, then the log; returns the outputs
    with size and sha256. Raises InfrastructureError when something could not be sent."""
    files, skipped = await asyncio.to_thread(scan_outputs, job.outputs)
    if skipped:
        log.warning(
            "skipped outputs that are not regular files: %s", skipped, extra={"job_id": task.job_id}
        )
    log_size = await asyncio.to_thread(os.path.getsize, job.log_file)
    plan = await agent.plan_outputs(task.job_id, task.attempt, files, log_size)
    targets = {u.path: u for u in plan.uploads}
    for file in files:
        target = targets.get(file.path)
        src = job.outputs / file.path
        if target is not None and target.multipart is not None:
            await upload_in_parts(agent, task, file, src, target.multipart)
        elif target is not None and target.upload_url is not None:
            await agent.upload(target.upload_url, src)
        else:
            raise InfrastructureError(f"no upload URL for output {file.path!r}")
    await agent.upload(plan.log_upload_url, job.log_file, "text/plain")
    return files
