"""A job whose image only a registry has: its machine pulls it, and the requester following
the job's events sees the pull's progress live, before the job runs."""

import asyncio
import json
import uuid

import httpx
import nats
from httpx_sse import connect_sse

from common.messages import PullProgress
from common.subjects import pull_subject
from gpumarket.platform import LocalPlatform
from tests.fixtures.platform import new_user
from tests.fixtures.registry import ImageRegistry

PULL_FIELDS = {
    "job_id",
    "attempt",
    "image",
    "status",
    "layers_done",
    "layers_total",
    "bytes_done",
    "bytes_total",
}


async def forge_pulls(nats_url: str, job_id: str) -> None:
    """Progress that is not this job's: another job's, and a message on this job's subject
    that names another job. Neither may reach this job's stream."""
    other = str(uuid.uuid4())
    nc = await nats.connect(nats_url)
    try:
        for subject_job, payload_job in ((other, other), (job_id, other)):
            forged = PullProgress(
                job_id=payload_job, attempt=0, image="forged/image:1", status="failed"
            )
            await nc.publish(pull_subject("forger", subject_job), forged.model_dump_json().encode())
        await nc.flush()
    finally:
        await nc.close()


class TestPullEvents:
    def test_pull_progress_streams_before_the_job_runs(
        self, platform: LocalPlatform, image_registry: ImageRegistry, registry_image: str
    ) -> None:
        assert platform.servers is not None
        requester = new_user(platform)
        spec = {
            "image": registry_image,
            "command": ["sh", "-c", "echo pulled; sleep 2"],
            "resources": {"gpus": 1},
            "max_duration_s": 120,
            # Keeps the job off the daemon-less machines other tests register.
            "max_price_per_gpu_hour": 1,
        }
        received: list[tuple[str, dict]] = []
        # Pull progress is live only: the registry holds the pull until the stream is open.
        image_registry.pause()
        try:
            job = requester.request("POST", "/v1/jobs", json=spec)
            url = f"{platform.gateway_url}/v1/jobs/{job['id']}/events"
            auth = {"Authorization": f"Bearer {requester.token}"}
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=60)) as http,
                connect_sse(http, "GET", url, headers=auth) as source,
            ):
                for sse in source.iter_sse():
                    received.append((sse.event, json.loads(sse.data)))
                    if len(received) == 1:
                        # The gateway listens from its first event on.
                        asyncio.run(forge_pulls(platform.servers.nats.url, job["id"]))
                        image_registry.resume()
                    if sse.event == "end":
                        break
        finally:
            image_registry.resume()

        pulls = [data for kind, data in received if kind == "pull"]
        statuses = [data["status"] for kind, data in received if kind == "status"]
        assert pulls, received
        assert all(set(p) == PULL_FIELDS and p["job_id"] == job["id"] for p in pulls)
        # Another test's simulated machine may take the first attempt and vanish: the
        # pulls are the attempt that ran.
        ran = [data for kind, data in received if kind == "status"][-1]["attempt"]
        assert {(p["attempt"], p["image"]) for p in pulls} == {(ran, registry_image)}
        assert [p["status"] for p in pulls[:-1]] == ["pulling"] * (len(pulls) - 1)
        last = pulls[-1]
        # The sample image's layer was there; the fresh one was pulled.
        assert (last["status"], last["layers_done"], last["layers_total"]) == ("done", 2, 2)
        assert last["bytes_done"] == last["bytes_total"]

        # Every pull event came before the job ran.
        order = [data["status"] if kind == "status" else kind for kind, data in received]
        assert max(i for i, step in enumerate(order) if step == "pull") < order.index("running")
        assert statuses[-1] == "succeeded"
        assert received[-1] == ("end", {"status": "succeeded"})
        assert ("log", {"attempt": ran, "line": "pulled"}) in received
