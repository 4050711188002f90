"""A job's data in and out on the real platform: a 1 GiB output in parts, inputs checked
against their sha256, the storage quota, deleting files, and expired outputs."""

import asyncio
import hashlib
import io
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from gpumarket.client import ApiError, Client
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from scheduler import states
from scheduler.schemas import JobOut
from tests.fixtures.platform import new_user

GIB = 1 << 30


def job_spec(command: str, **overrides: Any) -> dict[str, Any]:
    # The price cap keeps jobs off the daemon-less machines other tests register.
    return {
        "image": SAMPLE_IMAGE,
        "command": ["sh", "-c", command],
        "resources": {"gpus": 1},
        "max_duration_s": 120,
        "max_price_per_gpu_hour": 1,
        **overrides,
    }


def run(client: Client, spec: dict[str, Any], timeout: float = 180) -> JobOut:
    job = client.submit(spec)
    return client.wait(job.id, timeout=timeout, poll_s=0.5)


def s3(platform: LocalPlatform) -> Minio:
    assert platform.servers is not None
    return platform.servers.s3.client()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sql(platform: LocalPlatform, statement: str, *args: object) -> str:
    assert platform.servers is not None
    dsn = platform.servers.postgres.dsn

    async def execute() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.execute(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(execute())


def me(client: Client) -> str:
    return client.request("GET", "/v1/me")["id"]


class TestBigOutputs:
    @pytest.mark.timeout(900)
    def test_a_1_gib_output_round_trips_with_its_sha256(
        self, platform: LocalPlatform, requester: Client, tmp_path: Path
    ) -> None:
        spec = job_spec(f"head -c {GIB} /dev/urandom > /outputs/big.bin", max_duration_s=600)
        job = run(requester, spec, timeout=800)
        assert job.status == states.SUCCEEDED, job.failure_reason

        [output] = requester.outputs(job.id)
        assert (output.path, output.size) == ("big.bin", GIB)
        # The client checks size and sha256 against the job's record as it downloads...
        downloaded = requester.download(output, tmp_path)
        try:
            # ...and the bytes on disk hash, by our own count, to what the job recorded.
            assert downloaded.stat().st_size == GIB
            assert file_sha256(downloaded) == output.sha256
        finally:
            downloaded.unlink()
        # It went up in 64 MiB parts: S3 gives a multipart object the ETag "<md5>-<parts>".
        stat = s3(platform).stat_object("gpumarket-outputs", f"{job.id}/{job.attempt}/big.bin")
        assert (stat.size, (stat.etag or "").split("-")[-1]) == (GIB, "16")
        assert requester.storage_usage().outputs_bytes >= GIB


class TestInputChecksums:
    def test_registering_a_file_needs_a_well_formed_sha256(self, requester: Client) -> None:
        for body in ({"filename": "f", "size": 1}, {"filename": "f", "size": 1, "sha256": "AB"}):
            with pytest.raises(ApiError) as err:
                requester.request("POST", "/v1/files", json=body)
            assert err.value.status_code == 422
            assert [e["field"] for e in err.value.body["errors"]] == ["sha256"]

    def test_the_upload_url_refuses_other_bytes(self, requester: Client) -> None:
        data = b"what the user meant to upload\n"
        body = {"filename": "f.txt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        record = requester.request("POST", "/v1/files", json=body)
        damaged = data.replace(b"meant", b"MEANT")
        assert httpx.put(record["upload_url"], content=damaged).status_code == 400
        assert httpx.put(record["upload_url"], content=data).status_code == 200
        assert requester.file(record["file_id"]).sha256 == hashlib.sha256(data).hexdigest()

    def test_an_input_damaged_in_storage_is_refused_by_the_daemon(
        self, platform: LocalPlatform, requester: Client
    ) -> None:
        data = b"the true input\n"
        upload = requester.upload(data, "in.txt")
        # The bytes change at rest, behind the platform's back (the S3 server's own keys).
        damaged = b"the TRUE input\n"
        key = f"{me(requester)}/{upload.file_id}"
        s3(platform).put_object("gpumarket-inputs", key, io.BytesIO(damaged), len(damaged))

        spec = job_spec(
            "cat /inputs/data/in.txt",
            inputs=[{"file_id": upload.file_id, "path": "data/in.txt"}],
            retries=0,
        )
        job = run(requester, spec)
        assert job.status == states.FAILED
        reason = job.failure_reason or ""
        assert "data/in.txt" in reason, reason
        assert hashlib.sha256(data).hexdigest() in reason
        assert hashlib.sha256(damaged).hexdigest() in reason


class TestQuota:
    def test_past_the_quota_uploads_and_submissions_wait_for_deletes(
        self, platform: LocalPlatform, requester: Client
    ) -> None:
        quota = requester.storage_usage().quota_bytes
        # Registered, never uploaded: a file counts from when it is registered.
        fake_sha = "0" * 64
        halves = [
            requester.request(
                "POST", "/v1/files", json={"filename": f"h{i}", "size": size, "sha256": fake_sha}
            )
            for i, size in enumerate((quota // 2, quota - quota // 2))
        ]
        with pytest.raises(ApiError) as err:
            requester.request(
                "POST", "/v1/files", json={"filename": "one", "size": 1, "sha256": fake_sha}
            )
        assert err.value.status_code == 403
        assert [e["field"] for e in err.value.body["errors"]] == ["size"]
        assert (err.value.body["used_bytes"], err.value.body["quota_bytes"]) == (quota, quota)
        assert err.value.body["size"] == 1

        # At the quota exactly, a job still runs; its output and log take the user past it
        # (outputs are never thrown away for the quota).
        job = run(requester, job_spec("echo result > /outputs/r.txt; echo done"))
        assert job.status == states.SUCCEEDED, job.failure_reason
        usage = requester.storage_usage()
        assert usage.used_bytes > quota and usage.outputs_bytes == len(b"result\n")
        assert usage.logs_bytes > 0

        unplaceable = job_spec("true", resources={"gpu_models": ["no-such-gpu"]})
        with pytest.raises(ApiError) as err:
            requester.submit(unplaceable)
        assert err.value.status_code == 403 and "quota" in err.value.body["detail"]
        with pytest.raises(ApiError) as err:
            requester.submit_array(template=unplaceable, count=2)
        assert err.value.status_code == 403 and "quota" in err.value.body["detail"]

        requester.delete_file(halves[0]["file_id"])
        assert requester.storage_usage().used_bytes < quota
        queued = requester.submit(unplaceable)
        requester.cancel(queued.id)


class TestDeletingFiles:
    def test_the_owner_deletes_a_file_and_its_bytes(
        self, platform: LocalPlatform, requester: Client
    ) -> None:
        data = b"x" * 1000
        upload = requester.upload(data, "gone.bin")
        key = f"{me(requester)}/{upload.file_id}"
        assert s3(platform).stat_object("gpumarket-inputs", key).size == len(data)
        assert requester.storage_usage().files_bytes == len(data)

        stranger = new_user(platform)
        with pytest.raises(ApiError) as err:
            stranger.delete_file(upload.file_id)
        assert err.value.status_code == 404
        assert requester.file(upload.file_id).size == len(data)

        requester.delete_file(upload.file_id)
        with pytest.raises(S3Error):
            s3(platform).stat_object("gpumarket-inputs", key)
        for call in (requester.file, requester.delete_file):
            with pytest.raises(ApiError) as err:
                call(upload.file_id)
            assert err.value.status_code == 404
        assert requester.storage_usage().files_bytes == 0


class TestExpiredOutputs:
    def test_outputs_and_log_past_retention_answer_410(
        self, platform: LocalPlatform, requester: Client
    ) -> None:
        job = run(requester, job_spec("echo kept > /outputs/k.txt; echo logged"))
        assert job.status == states.SUCCEEDED, job.failure_reason
        assert [o.path for o in requester.outputs(job.id)] == ["k.txt"]
        assert "logged" in requester.logs(job.id)

        # As if uploaded 31 days ago: past the platform's 30-day retention.
        sql(
            platform,
            "UPDATE stored_objects SET created_at = now() - interval '31 days' WHERE key LIKE $1",
            f"{job.id}/%",
        )
        for read in (requester.outputs, requester.logs):
            with pytest.raises(ApiError) as err:
                read(job.id)
            assert err.value.status_code == 410
            assert "expired at" in err.value.body["detail"]
            assert err.value.body["expired_at"]
        assert requester.storage_usage().outputs_bytes == 0
