"""The daemon's transfers against a local HTTP server standing in for the gateway's agent
API and for object storage: input checksums, and big outputs sent in parts."""

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.messages import TaskAssignment, TaskInput
from provider_daemon import transfers
from provider_daemon.agent_api import AgentApi
from provider_daemon.errors import InfrastructureError
from provider_daemon.transfers import fetch_inputs, part_ranges, upload_results
from provider_daemon.workspace import JobDir, create_job_dir
from tests.provider_daemon.conftest import serving

CREDENTIAL = "gpma_test"


@dataclass
class Storage:
    """The agent API and object storage as the daemon sees them, recorded."""

    url: str = ""
    # Inputs: path -> (bytes served, sha256 the platform has for them).
    inputs: dict[str, tuple[bytes, str | None]] = field(default_factory=dict)
    downloads: dict[str, int] = field(default_factory=dict)
    # Outputs at or over this size are planned in parts of part_size bytes.
    threshold: int = 1_000_000
    part_size: int = 300_000
    objects: dict[str, bytes] = field(default_factory=dict)
    parts: dict[tuple[str, int], bytes] = field(default_factory=dict)
    part_lengths: dict[tuple[str, int], str | None] = field(default_factory=dict)
    # Answers a part gets before it is accepted: part number -> statuses.
    part_failures: dict[int, list[int]] = field(default_factory=dict)
    part_attempts: dict[tuple[str, int], int] = field(default_factory=dict)
    in_flight: int = 0
    most_in_flight: int = 0
    uploads: dict[str, str] = field(default_factory=dict)  # upload id -> path
    completed: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    log: bytes | None = None

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {CREDENTIAL}"

    async def list_inputs(self, request: Request) -> Response:
        assert self._authorized(request)
        return JSONResponse(
            [
                {
                    "file_id": f"file-{i}",
                    "path": path,
                    "size": len(content),
                    "sha256": sha256,
                    "download_url": f"{self.url}/objects/{i}",
                }
                for i, (path, (content, sha256)) in enumerate(self.inputs.items())
            ]
        )

    async def download(self, request: Request) -> Response:
        assert "authorization" not in request.headers
        path, (content, _) = list(self.inputs.items())[int(request.path_params["index"])]
        self.downloads[path] = self.downloads.get(path, 0) + 1
        return Response(content)

    async def plan(self, request: Request) -> Response:
        assert self._authorized(request)
        body = await request.json()
        self.plans.append(body)
        uploads = []
        for f in body["files"]:
            if f["size"] < self.threshold:
                uploads.append({"path": f["path"], "upload_url": f"{self.url}/put/{f['path']}"})
                continue
            upload_id = uuid.uuid4().hex
            self.uploads[upload_id] = f["path"]
            count = len(part_ranges(f["size"], self.part_size))
            urls = [f"{self.url}/parts/{upload_id}/{n}" for n in range(1, count + 1)]
            multipart = {"upload_id": upload_id, "part_size": self.part_size, "part_urls": urls}
            uploads.append({"path": f["path"], "multipart": multipart})
        return JSONResponse({"uploads": uploads, "log_upload_url": f"{self.url}/log"})

    async def put_part(self, request: Request) -> Response:
        assert "authorization" not in request.headers
        key = (request.path_params["upload_id"], int(request.path_params["number"]))
        self.part_attempts[key] = self.part_attempts.get(key, 0) + 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.body()
            await asyncio.sleep(0.05)  # long enough for parts to overlap
        finally:
            self.in_flight -= 1
        failures = self.part_failures.get(key[1], [])
        if failures:
            return Response(status_code=failures.pop(0))
        self.parts[key] = body
        self.part_lengths[key] = request.headers.get("content-length")
        return Response(headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    async def complete(self, request: Request) -> Response:
        assert self._authorized(request)
        body = await request.json()
        self.completed.append(body)
        upload_id = body["upload_id"]
        assert self.uploads[upload_id] == body["path"]
        joined = b""
        for part in body["parts"]:
            content = self.parts[(upload_id, part["part_number"])]
            assert part["etag"] == f'"{hashlib.md5(content).hexdigest()}"'
            joined += content
        self.objects[body["path"]] = joined
        return JSONResponse({"path": body["path"], "size": len(joined)})

    async def abort(self, request: Request) -> Response:
        assert self._authorized(request)
        self.aborted.append(await request.json())
        return Response(status_code=204)

    async def put_object(self, request: Request) -> Response:
        self.objects[request.path_params["path"]] = await request.body()
        return Response()

    async def put_log(self, request: Request) -> Response:
        self.log = await request.body()
        return Response()

    def app(self) -> Starlette:
        jobs = "/v1/agent/jobs/{job_id}"
        return Starlette(
            routes=[
                Route(f"{jobs}/inputs", self.list_inputs),
                Route(f"{jobs}/outputs", self.plan, methods=["POST"]),
                Route(f"{jobs}/outputs/complete", self.complete, methods=["POST"]),
                Route(f"{jobs}/outputs/abort", self.abort, methods=["POST"]),
                Route("/objects/{index:int}", self.download),
                Route("/parts/{upload_id}/{number:int}", self.put_part, methods=["PUT"]),
                Route("/put/{path:path}", self.put_object, methods=["PUT"]),
                Route("/log", self.put_log, methods=["PUT"]),
            ]
        )


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    fake = Storage()
    async with serving(fake.app(), "the test server") as url:
        fake.url = url
        yield fake


@pytest.fixture
async def agent(storage: Storage) -> AsyncIterator[AgentApi]:
    api = AgentApi(storage.url, CREDENTIAL, timeout_s=10)
    yield api
    await api.aclose()


def task(inputs: list[str] | None = None) -> TaskAssignment:
    return TaskAssignment(
        job_id=f"job-{uuid.uuid4().hex[:12]}",
        attempt=1,
        image="img",
        command=["true"],
        gpu_uuids=[],
        inputs=[TaskInput(file_id=f"file-{i}", path=p) for i, p in enumerate(inputs or [])],
        max_duration_s=60,
    )


@pytest.fixture
def job(tmp_path: Path) -> JobDir:
    job = create_job_dir(tmp_path, "job-x", 1)
    job.log_file.write_bytes(b"line one\nline two\n")
    return job


class TestPartRanges:
    @pytest.mark.parametrize(
        ("size", "part", "expected"),
        [
            (10, 4, [(0, 4), (4, 4), (8, 2)]),
            (12, 4, [(0, 4), (4, 4), (8, 4)]),
            (3, 4, [(0, 3)]),
            (0, 4, []),
        ],
    )
    def test_parts_cover_the_file_once(self, size: int, part: int, expected: list) -> None:
        assert part_ranges(size, part) == expected

    def test_a_1_gib_file_in_64_mib_parts(self) -> None:
        ranges = part_ranges(1 << 30, 64 << 20)
        assert len(ranges) == 16 and sum(length for _, length in ranges) == 1 << 30


class TestInputChecksums:
    async def test_matching_bytes_are_kept(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        data = b"the real input\n"
        storage.inputs = {"data/in.txt": (data, hashlib.sha256(data).hexdigest())}
        assert await fetch_inputs(agent, task(["data/in.txt"]), job) == 1
        assert (job.inputs / "data" / "in.txt").read_bytes() == data
        assert storage.downloads["data/in.txt"] == 1

    async def test_a_mismatch_is_refused_after_retries_naming_path_and_digests(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        # Same size, other bytes: only the checksum can tell.
        uploaded, served = b"what was uploaded", b"what is served..."
        assert len(uploaded) == len(served)
        expected, got = hashlib.sha256(uploaded).hexdigest(), hashlib.sha256(served).hexdigest()
        storage.inputs = {"data/in.txt": (served, expected)}
        with pytest.raises(InfrastructureError) as err:
            await fetch_inputs(agent, task(["data/in.txt"]), job)
        message = str(err.value)
        assert "data/in.txt" in message and expected in message and got in message
        assert storage.downloads["data/in.txt"] == agent.attempts

    async def test_an_input_without_a_checksum_is_not_checked(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        storage.inputs = {"old.txt": (b"registered before checksums", None)}
        assert await fetch_inputs(agent, task(["old.txt"]), job) == 1


class TestMultipartOutputs:
    async def test_a_big_output_goes_up_in_parts_and_small_ones_in_one_put(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        big = os.urandom(1_000_000)  # 4 parts: 3 x 300,000 and 100,000
        (job.outputs / "big.bin").write_bytes(big)
        (job.outputs / "small.txt").write_bytes(b"small\n")
        the_task = task()
        files = await upload_results(agent, the_task, job)

        assert {f.path: f.sha256 for f in files} == {
            "big.bin": hashlib.sha256(big).hexdigest(),
            "small.txt": hashlib.sha256(b"small\n").hexdigest(),
        }
        assert storage.objects["big.bin"] == big
        assert storage.objects["small.txt"] == b"small\n"
        [done] = storage.completed
        assert [p["part_number"] for p in done["parts"]] == [1, 2, 3, 4]
        assert done["attempt"] == 1 and done["path"] == "big.bin"
        # Each part is sent with its exact length (S3 refuses chunked uploads).
        lengths = sorted(v for (u, _), v in storage.part_lengths.items())
        assert lengths == ["100000", "300000", "300000", "300000"]
        assert storage.log == b"line one\nline two\n"
        assert storage.plans[0]["log_size"] == len(b"line one\nline two\n")
        assert not storage.aborted

    async def test_parts_go_a_few_at_a_time(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        storage.threshold, storage.part_size = 100_000, 100_000
        (job.outputs / "big.bin").write_bytes(os.urandom(1_000_000))  # 10 parts
        await upload_results(agent, task(), job)
        assert storage.most_in_flight == transfers.PART_CONCURRENCY

    async def test_a_part_that_fails_for_a_moment_is_sent_again(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        big = os.urandom(1_000_000)
        (job.outputs / "big.bin").write_bytes(big)
        storage.part_failures[2] = [503]
        await upload_results(agent, task(), job)
        [upload_id] = storage.uploads
        assert storage.part_attempts[(upload_id, 2)] == 2
        assert storage.part_attempts[(upload_id, 1)] == 1
        assert storage.objects["big.bin"] == big
        assert not storage.aborted

    async def test_a_part_refused_for_good_aborts_the_upload(
        self, storage: Storage, agent: AgentApi, job: JobDir
    ) -> None:
        (job.outputs / "big.bin").write_bytes(os.urandom(1_000_000))
        storage.part_failures[3] = [403]
        with pytest.raises(InfrastructureError, match=re.escape("big.bin part 3/4")):
            await upload_results(agent, task(), job)
        [upload_id] = storage.uploads
        assert storage.aborted == [{"attempt": 1, "path": "big.bin", "upload_id": upload_id}]
        assert not storage.completed and "big.bin" not in storage.objects
        assert storage.log is None  # nothing more is sent once an output failed
