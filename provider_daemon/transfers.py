"""A job attempt's data: its inputs fetched before the container starts, its outputs and
log uploaded after it ends, all through presigned URLs (the daemon holds no storage keys)."""

import asyncio
import logging

from common.messages import OutputFile, TaskAssignment
from provider_daemon.agent_api import AgentApi
from provider_daemon.errors import InfrastructureError
from provider_daemon.workspace import JobDir, safe_input_path, scan_outputs

log = logging.getLogger(__name__)


async def fetch_inputs(agent: AgentApi, task: TaskAssignment, job: JobDir) -> int:
    """Downloads the task's inputs under job.inputs; returns how many files."""
    if not task.inputs:
        return 0
    files = await agent.list_inputs(task.job_id, task.attempt)
    for item in files:
        dest = safe_input_path(job.inputs, item.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await agent.download(item.download_url, dest, item.size)
    return len(files)


async def upload_results(agent: AgentApi, task: TaskAssignment, job: JobDir) -> list[OutputFile]:
    """Uploads every regular file under job.outputs, then the log; returns the outputs
    with size and sha256. Raises InfrastructureError when something could not be sent."""
    files, skipped = await asyncio.to_thread(scan_outputs, job.outputs)
    if skipped:
        log.warning(
            "skipped outputs that are not regular files: %s", skipped, extra={"job_id": task.job_id}
        )
    plan = await agent.plan_outputs(task.job_id, task.attempt, files)
    targets = {u.path: u.upload_url for u in plan.uploads}
    for file in files:
        if file.path not in targets:
            raise InfrastructureError(f"no upload URL for output {file.path!r}")
        await agent.upload(targets[file.path], job.outputs / file.path)
    await agent.upload(plan.log_upload_url, job.log_file, "text/plain")
    return files
