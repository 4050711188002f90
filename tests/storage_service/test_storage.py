"""storage_service on the real S3 server and Postgres: checksummed inputs, the quota,
multipart outputs, and retention (lifecycle rules and the sweeper)."""

import asyncio
import hashlib
import os
import time
import uuid
from datetime import datetime

import httpx
import pytest
from minio.error import S3Error

from storage_service.settings import MAX_PARTS, MIB, StorageSettings
from storage_service.uploads import part_size
from tests.storage_service.conftest import RunningStorage, StartStorage


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def create_file(
    storage: RunningStorage, owner: str, data: bytes, **fields: object
) -> httpx.Response:
    body = {"owner_id": owner, "filename": "in.bin", "size": len(data), "sha256": sha256(data)}
    return await storage.http.post("/internal/files", json={**body, **fields})


async def plan(
    storage: RunningStorage, owner: str, bucket: str, objects: list[dict]
) -> httpx.Response:
    body = {"owner_id": owner, "bucket": bucket, "objects": objects}
    return await storage.http.post("/internal/uploads", json=body)


async def put(url: str, data: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.put(url, content=data)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.get(url)


async def usage(storage: RunningStorage, owner: str) -> dict:
    response = await storage.http.get("/internal/usage", params={"owner_id": owner})
    assert response.status_code == 200, response.text
    return response.json()


def exists(storage: RunningStorage, kind: str, key: str) -> bool:
    try:
        storage.s3.stat_object(storage.bucket(kind), key)
    except S3Error as exc:
        assert exc.code in ("NoSuchKey", "NoSuchObject"), exc
        return False
    return True


def owner() -> str:
    return str(uuid.uuid4())


class TestInputFiles:
    async def test_the_upload_url_takes_only_the_declared_bytes(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage()
        me, data = owner(), b"the dataset\n"
        record = (await create_file(storage, me, data)).json()
        assert record["sha256"] == sha256(data)
        # The same length with other bytes: S3 checks the sha256 signed into the URL.
        assert (await put(record["upload_url"], b"the datases\n")).status_code == 400
        assert (await put(record["upload_url"], data)).status_code == 200

        got = await storage.http.get(f"/internal/files/{record['file_id']}")
        assert got.json()["sha256"] == sha256(data)
        assert (await get(got.json()["download_url"])).content == data

    @pytest.mark.parametrize("bad", ["ABC", "0" * 63, "G" * 64, "A" * 64])
    async def test_a_malformed_sha256_is_422_naming_it(
        self, start_storage: StartStorage, bad: str
    ) -> None:
        storage = await start_storage()
        response = await create_file(storage, owner(), b"x", sha256=bad)
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["sha256"]

    async def test_delete_removes_the_object_and_the_record(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage()
        me, data = owner(), b"to delete"
        record = (await create_file(storage, me, data)).json()
        await put(record["upload_url"], data)
        key = f"{me}/{record['file_id']}"
        assert exists(storage, "inputs", key)

        path = f"/internal/files/{record['file_id']}"
        someone_else = await storage.http.delete(path, params={"owner_id": owner()})
        assert someone_else.status_code == 404 and exists(storage, "inputs", key)
        assert (await storage.http.delete(path, params={"owner_id": me})).status_code == 204
        assert not exists(storage, "inputs", key)
        assert (await storage.http.get(path)).status_code == 404
        assert (await usage(storage, me))["files_bytes"] == 0


class TestQuota:
    async def test_a_file_past_the_quota_is_refused_naming_size(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage(quota_bytes=1000)
        me = owner()
        assert (await create_file(storage, me, b"a" * 600)).status_code == 201
        refused = await create_file(storage, me, b"b" * 500)
        assert refused.status_code == 403
        body = refused.json()
        assert [e["field"] for e in body["errors"]] == ["size"]
        assert (body["used_bytes"], body["quota_bytes"], body["size"]) == (600, 1000, 500)
        assert "600 bytes used of a 1000 bytes quota" in body["detail"]
        # Someone else's usage is their own.
        assert (await create_file(storage, owner(), b"c" * 900)).status_code == 201

    async def test_outputs_and_logs_count_and_may_pass_the_quota(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage(quota_bytes=1000)
        me = owner()
        await create_file(storage, me, b"a" * 600)
        job = uuid.uuid4()
        outputs = [{"key": f"{job}/0/out.bin", "size": 700, "sha256": sha256(b"o" * 700)}]
        assert (await plan(storage, me, "outputs", outputs)).status_code == 200
        assert (await plan(storage, me, "logs", [{"key": f"{job}/0.log", "size": 50}])).is_success
        # Planning again (a retried call) replaces the record instead of counting twice.
        assert (await plan(storage, me, "outputs", outputs)).status_code == 200
        used = await usage(storage, me)
        assert used == {
            "used_bytes": 1350,
            "quota_bytes": 1000,
            "files_bytes": 600,
            "outputs_bytes": 700,
            "logs_bytes": 50,
            "retention_s": storage.settings.retention_s,
        }
        assert (await create_file(storage, me, b"x")).status_code == 403

    async def test_concurrent_files_cannot_both_squeeze_under_the_quota(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage(quota_bytes=1000)
        me = owner()
        answers = await asyncio.gather(
            *(create_file(storage, me, bytes([i]) * 400) for i in range(5))
        )
        assert sorted(a.status_code for a in answers) == [201, 201, 403, 403, 403]


class TestMultipartOutputs:
    async def test_a_big_output_goes_up_in_parts(self, start_storage: StartStorage) -> None:
        storage = await start_storage(multipart_threshold=5 * MIB, part_size=5 * MIB)
        me, job = owner(), uuid.uuid4()
        big, small = os.urandom(12 * MIB), b"small output\n"
        objects = [
            {"key": f"{job}/0/big.bin", "size": len(big), "sha256": sha256(big)},
            {"key": f"{job}/0/small.txt", "size": len(small), "sha256": sha256(small)},
        ]
        planned = (await plan(storage, me, "outputs", objects)).json()
        big_plan, small_plan = planned["uploads"]
        assert big_plan["url"] is None and small_plan["multipart"] is None
        parts = big_plan["multipart"]
        assert parts["part_size"] == 5 * MIB and len(parts["part_urls"]) == 3

        etags = []
        for n, url in enumerate(parts["part_urls"]):
            sent = await put(url, big[n * 5 * MIB : (n + 1) * 5 * MIB])
            assert sent.status_code == 200, sent.text
            etags.append(sent.headers["etag"])
        completion = {
            "bucket": "outputs",
            "key": objects[0]["key"],
            "upload_id": parts["upload_id"],
            "parts": [{"part_number": n, "etag": e} for n, e in enumerate(etags, 1)],
        }
        done = await storage.http.post("/internal/uploads/complete", json=completion)
        assert done.json() == {"key": objects[0]["key"], "size": len(big)}
        # A retry whose first answer was lost gets the same answer.
        again = await storage.http.post("/internal/uploads/complete", json=completion)
        assert again.json() == done.json()
        # A small output's URL is bound to its sha256 too.
        assert (await put(small_plan["url"], b"small 0utput\n")).status_code == 400
        assert (await put(small_plan["url"], small)).status_code == 200

        keys = [o["key"] for o in objects]
        urls = await storage.http.post(
            "/internal/presign", json={"bucket": "outputs", "keys": keys, "method": "GET"}
        )
        big_url, small_url = urls.json()["urls"]
        assert sha256((await get(big_url)).content) == sha256(big)
        assert (await get(small_url)).content == small

    async def test_parts_out_of_order_are_422(self, start_storage: StartStorage) -> None:
        storage = await start_storage()
        body = {
            "bucket": "outputs",
            "key": "k",
            "upload_id": "u",
            "parts": [{"part_number": 2, "etag": "a"}, {"part_number": 1, "etag": "b"}],
        }
        response = await storage.http.post("/internal/uploads/complete", json=body)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "parts"

    async def test_an_aborted_upload_leaves_nothing_and_counts_for_nobody(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage(multipart_threshold=5 * MIB, part_size=5 * MIB)
        me, key = owner(), f"{uuid.uuid4()}/0/big.bin"
        planned = await plan(storage, me, "outputs", [{"key": key, "size": 6 * MIB}])
        parts = planned.json()["uploads"][0]["multipart"]
        assert (await put(parts["part_urls"][0], os.urandom(5 * MIB))).status_code == 200
        assert (await usage(storage, me))["outputs_bytes"] == 6 * MIB

        ref = {"bucket": "outputs", "key": key, "upload_id": parts["upload_id"]}
        assert (await storage.http.post("/internal/uploads/abort", json=ref)).status_code == 204
        assert (await usage(storage, me))["outputs_bytes"] == 0
        future = datetime.max.replace(tzinfo=None)
        store = storage.app.state.store
        left = await asyncio.to_thread(store.stale_uploads, "outputs", future.astimezone())
        assert key not in [k for k, _ in left]
        late = await storage.http.post(
            "/internal/uploads/complete",
            json={**ref, "parts": [{"part_number": 1, "etag": "x"}]},
        )
        assert late.status_code == 404

    def test_parts_grow_for_files_past_10000_parts(self) -> None:
        settings = StorageSettings(dev_mode=True, part_size=5 * MIB)
        assert part_size(settings, 5 * MIB * MAX_PARTS) == 5 * MIB
        bigger = part_size(settings, 5 * MIB * MAX_PARTS + 1)
        assert bigger % MIB == 0 and bigger * MAX_PARTS >= 5 * MIB * MAX_PARTS + 1

    async def test_a_log_is_always_one_put(self, start_storage: StartStorage) -> None:
        storage = await start_storage(multipart_threshold=5 * MIB, part_size=5 * MIB)
        planned = await plan(storage, owner(), "logs", [{"key": "j/0.log", "size": 100 * MIB}])
        [upload] = planned.json()["uploads"]
        assert upload["url"] and upload["multipart"] is None

    async def test_an_object_too_big_for_s3_is_422(self, start_storage: StartStorage) -> None:
        storage = await start_storage()
        too_big = 5 * 1024**3 * MAX_PARTS + 1
        planned = await plan(storage, owner(), "outputs", [{"key": "k", "size": too_big}])
        assert planned.status_code == 422
        assert planned.json()["errors"][0]["field"] == "objects.0.size"


class TestRetention:
    async def test_the_sweeper_deletes_what_is_older_than_retention(
        self, start_storage: StartStorage
    ) -> None:
        storage = await start_storage(
            retention_s=2, sweep_interval_s=0.5, multipart_threshold=5 * MIB, part_size=5 * MIB
        )
        me, job = owner(), uuid.uuid4()
        data = b"input bytes"
        record = (await create_file(storage, me, data)).json()
        assert (await put(record["upload_url"], data)).status_code == 200
        out, log_key = f"{job}/0/out.txt", f"{job}/0.log"
        outputs = [
            {"key": out, "size": 3, "sha256": sha256(b"out")},
            {"key": f"{job}/0/big.bin", "size": 6 * MIB},  # never finished
        ]
        planned = (await plan(storage, me, "outputs", outputs)).json()["uploads"]
        assert (await put(planned[0]["url"], b"out")).status_code == 200
        [log_plan] = (await plan(storage, me, "logs", [{"key": log_key, "size": 4}])).json()[
            "uploads"
        ]
        assert (await put(log_plan["url"], b"log\n")).status_code == 200
        reads = {"bucket": "outputs", "keys": [out], "method": "GET"}
        assert (await storage.http.post("/internal/presign", json=reads)).status_code == 200

        deadline = time.monotonic() + 20
        while exists(storage, "outputs", out) or exists(storage, "logs", log_key):
            assert time.monotonic() < deadline, "the sweeper never deleted the outputs"
            await asyncio.sleep(0.25)
        # The objects go first, then their records are marked deleted.
        while (await usage(storage, me))["used_bytes"] != 0:
            assert time.monotonic() < deadline, "the sweeper never marked its deletes"
            await asyncio.sleep(0.25)
        assert not exists(storage, "inputs", f"{me}/{record['file_id']}")
        assert (await storage.http.get(f"/internal/files/{record['file_id']}")).status_code == 404
        assert (await usage(storage, me))["used_bytes"] == 0
        store = storage.app.state.store
        left = await asyncio.to_thread(store.stale_uploads, "outputs", datetime.max.astimezone())
        assert f"{job}/0/big.bin" not in [k for k, _ in left]

        # A reader is told they expired, and when, instead of getting a URL to nothing.
        gone = await storage.http.post("/internal/presign", json=reads)
        assert gone.status_code == 410
        assert "expired" in gone.json()["detail"]
        assert datetime.fromisoformat(gone.json()["expired_at"]) < datetime.now().astimezone()
        logs = {"bucket": "logs", "keys": [log_key], "method": "GET"}
        assert (await storage.http.post("/internal/presign", json=logs)).status_code == 410

    async def test_lifecycle_rules_are_set_where_the_server_takes_them(
        self, start_storage: StartStorage, s3_server
    ) -> None:  # type: ignore[no-untyped-def]
        storage = await start_storage(retention_s=36 * 3600)
        accepted = storage.app.state.lifecycle
        if s3_server.kind == "seaweedfs":
            # Seen with SeaweedFS 4.x: it takes the rules and answers them back.
            assert accepted == {"outputs": True, "logs": True}
        for kind, took in accepted.items():
            if took:
                config = storage.s3.get_bucket_lifecycle(storage.bucket(kind))
                days = {r.expiration.days for r in config.rules if r.expiration}
                assert days == {2}  # 36 hours, rounded up to whole days

    async def test_no_lifecycle_rules_when_turned_off(self, start_storage: StartStorage) -> None:
        storage = await start_storage(lifecycle_rules=False)
        assert storage.app.state.lifecycle == {}
        assert storage.s3.get_bucket_lifecycle(storage.bucket("outputs")) is None
