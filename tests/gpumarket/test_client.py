"""The Python client: retries, token refresh, resumed event streams and checked transfers
(unit tests over a fake transport), then the async client on the real platform."""

import asyncio
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from httpx_retries import retry as retry_module

from gpumarket.client import (
    ApiError,
    AsyncClient,
    Client,
    EndEvent,
    LogEvent,
    StatusEvent,
    TransferError,
)
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from scheduler.schemas import JobOut
from tests.fixtures.platform import new_user

API = "http://api.test"
Handler = Callable[[httpx.Request], httpx.Response]


def job_json(status: str = "queued", **fields: object) -> dict:
    return JobOut(
        id="6f1c2d3e-0000-4000-8000-000000000001",
        status=status,
        waiting_reason=None,
        attempt=0,
        provider_id=None,
        exit_code=None,
        failure_reason=None,
        image="img",
        command=["true"],
        resources={"gpus": 1},  # type: ignore[arg-type]
        max_price_per_gpu_hour=None,
        price_per_gpu_hour=None,
        max_duration_s=60,
        priority=0,
        retries=2,
        retry_on_exit_codes=[],
        created_at=datetime(2026, 11, 25, tzinfo=UTC),
        assigned_at=None,
        started_at=None,
        finished_at=None,
        **fields,  # type: ignore[arg-type]
    ).model_dump(mode="json")


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits between retries, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(retry_module.time, "sleep", waits.append)

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(retry_module.asyncio, "sleep", asleep)
    return waits


def fake(handler: Handler, token: str | None = "t", **kwargs: object) -> Client:
    return Client(API, token=token, transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]


class TestRetries:
    def test_429_is_sent_again_after_the_servers_retry_after(self, slept: list[float]) -> None:
        answers = iter(
            [
                httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "7"}),
                httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "2"}),
                httpx.Response(202, json=job_json()),
            ]
        )
        sent: list[bytes] = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.append(request.content)
            return next(answers)

        job = fake(handler).submit({"image": "img", "command": ["true"], "max_duration_s": 60})
        assert job.status == "queued"
        assert slept == [7.0, 2.0]
        assert len(sent) == 3 and len(set(sent)) == 1  # the same POST body each time

    def test_503_is_retried_with_backoff_but_500_and_4xx_are_not(self, slept: list[float]) -> None:
        calls = {"n": 0}

        def flaky(_: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            if calls["n"] < 3:
                return httpx.Response(503, json={"detail": "auth is unreachable"})
            return httpx.Response(
                200,
                json={
                    "id": "u",
                    "email": "a@b.c",
                    "roles": [],
                    "disabled": False,
                    "created_at": "2026-11-25T00:00:00Z",
                },
            )

        assert fake(flaky).me().email == "a@b.c"
        assert calls["n"] == 3 and len(slept) == 2
        for status in (500, 404, 422):
            calls["n"] = 0

            def fails(_: httpx.Request, status: int = status) -> httpx.Response:
                calls["n"] += 1
                return httpx.Response(status, json={"detail": "no"})

            with pytest.raises(ApiError) as err:
                fake(fails).me()
            assert err.value.status_code == status and calls["n"] == 1

    def test_gives_up_after_its_retries_with_the_last_answer(self, slept: list[float]) -> None:
        def always(_: httpx.Request) -> httpx.Response:
            return httpx.Response(
                429, json={"detail": "the limit is 1/hour"}, headers={"Retry-After": "3600"}
            )

        with pytest.raises(ApiError) as err:
            fake(always).jobs()
        assert err.value.status_code == 429 and err.value.retry_after == "3600"
        assert len(slept) == 5 and max(slept) <= 60  # a long Retry-After is capped

    def test_async_client_honours_retry_after_too(self, slept: list[float]) -> None:
        answers = iter(
            [
                httpx.Response(429, json={"detail": "wait"}, headers={"Retry-After": "4"}),
                httpx.Response(200, json=[job_json()]),
            ]
        )

        async def run() -> list[JobOut]:
            transport = httpx.MockTransport(lambda _: next(answers))
            async with AsyncClient(API, token="t", transport=transport) as client:
                return await client.jobs()

        assert [j.status for j in asyncio.run(run())] == ["queued"]
        assert slept == [4.0]


class TestErrorsAndTokens:
    def test_api_error_names_the_field(self) -> None:
        def refuse(_: httpx.Request) -> httpx.Response:
            return httpx.Response(
                422,
                json={
                    "detail": "resources.gpus: too many",
                    "errors": [{"field": "resources.gpus", "reason": "too many"}],
                },
            )

        with pytest.raises(ApiError) as err:
            fake(refuse).job("x")
        assert (err.value.status_code, err.value.field) == (422, "resources.gpus")

    def test_a_bad_spec_fails_before_it_is_sent(self) -> None:
        def never(_: httpx.Request) -> httpx.Response:
            raise AssertionError("sent")

        with pytest.raises(ValueError, match="max_duration_s"):
            fake(never).submit({"image": "img", "command": ["true"]})

    def test_an_expired_session_is_refreshed_once_and_the_call_sent_again(self) -> None:
        seen: list[tuple[str, str | None]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append((request.url.path, request.headers.get("Authorization")))
            if request.url.path == "/v1/auth/refresh":
                assert json.loads(request.content) == {"refresh_token": "r1"}
                return httpx.Response(
                    200,
                    json={
                        "access_token": "new",
                        "expires_in": 900,
                        "refresh_token": "r2",
                        "refresh_expires_in": 9,
                    },
                )
            if request.headers["Authorization"] == "Bearer old":
                return httpx.Response(401, json={"detail": "token expired"})
            return httpx.Response(200, json=[])

        client = fake(handler, token="old", refresh_token="r1")
        assert client.jobs() == []
        assert seen == [
            ("/v1/jobs", "Bearer old"),
            ("/v1/auth/refresh", None),
            ("/v1/jobs", "Bearer new"),
        ]
        assert (client.token, client.refresh_token) == ("new", "r2")


def sse(*events: tuple[str, object]) -> bytes:
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
    )


class TestEvents:
    def test_a_dropped_stream_resumes_without_repeating_lines(self, slept: list[float]) -> None:
        queued, running = job_json("queued"), job_json("running")
        first = sse(
            ("status", queued),
            ("log", {"attempt": 0, "line": "one"}),
            ("log", {"attempt": 0, "line": "two"}),
        )
        second = sse(
            ("status", running),
            ("log", {"attempt": 0, "line": "one"}),
            ("log", {"attempt": 0, "line": "two"}),
            ("log", {"attempt": 0, "line": "three"}),
            ("unknown-kind", {}),
            ("end", {"status": "succeeded"}),
        )
        bodies = iter([first, second])

        def handler(_: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200, content=next(bodies), headers={"content-type": "text/event-stream"}
            )

        events = list(fake(handler).events("job"))
        shown = [
            e.line
            if isinstance(e, LogEvent)
            else e.job.status
            if isinstance(e, StatusEvent)
            else e.status
            if isinstance(e, EndEvent)
            else e
            for e in events
        ]
        assert shown == ["queued", "one", "two", "running", "three", "succeeded"]

    def test_a_refused_stream_raises(self) -> None:
        def handler(_: httpx.Request) -> httpx.Response:
            return httpx.Response(404, json={"detail": "job not found"})

        with pytest.raises(ApiError) as err:
            list(fake(handler).events("job"))
        assert err.value.status_code == 404


class TestTransfers:
    def test_upload_streams_the_file_with_its_length(self, tmp_path: Path) -> None:
        source = tmp_path / "big.bin"
        source.write_bytes(b"x" * 3_000_000)
        put: dict[str, object] = {}

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/files":
                sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
                assert json.loads(request.content) == {
                    "filename": "big.bin",
                    "size": 3_000_000,
                    "sha256": sha256,
                }
                return httpx.Response(
                    201,
                    json={
                        "file_id": "f",
                        "filename": "big.bin",
                        "size": 3_000_000,
                        "sha256": sha256,
                        "upload_url": "http://s3.test/b/k",
                        "expires_at": "2026-11-25T01:00:00Z",
                    },
                )
            put["length"] = request.headers["Content-Length"]
            put["body"] = request.read()
            return httpx.Response(200)

        moved: list[int] = []
        record = fake(handler).upload(source, progress=moved.append)
        assert record.file_id == "f"
        assert put == {"length": "3000000", "body": source.read_bytes()}
        assert sum(moved) == 3_000_000 and len(moved) == 3  # read in 1 MiB chunks

    def test_a_damaged_download_is_refused_and_leaves_nothing(self, tmp_path: Path) -> None:
        from gateway.schemas import OutputOut

        good = b"the real bytes"
        output = OutputOut(
            path="sub/out.txt",
            size=len(good),
            sha256=hashlib.sha256(good).hexdigest(),
            download_url="http://s3.test/o",
            expires_at=datetime.now(UTC),
        )
        client = fake(lambda _: httpx.Response(200, content=b"the fake bytes"))
        with pytest.raises(TransferError, match="sha256"):
            client.download(output, tmp_path)
        assert list(tmp_path.rglob("*.txt")) == [] and list(tmp_path.rglob("*.part")) == []

        right = fake(lambda _: httpx.Response(200, content=good))
        assert right.download(output, tmp_path).read_bytes() == good
        # Already there with the same bytes: not fetched again.
        never = fake(lambda _: httpx.Response(500))
        assert never.download(output, tmp_path) == tmp_path / "sub" / "out.txt"

    def test_an_output_path_cannot_climb_out(self, tmp_path: Path) -> None:
        from gateway.schemas import OutputOut

        output = OutputOut(
            path="../escape.txt",
            size=1,
            sha256="0" * 64,
            download_url="http://s3.test/o",
            expires_at=datetime.now(UTC),
        )
        with pytest.raises(TransferError, match="relative"):
            fake(lambda _: httpx.Response(200, content=b"x")).download(output, tmp_path / "d")


def test_the_async_client_runs_a_job_end_to_end(platform: LocalPlatform, tmp_path: Path) -> None:
    token = new_user(platform).token

    async def run() -> tuple[JobOut, list[str], bytes]:
        async with AsyncClient(platform.gateway_url, token=token) as client:
            upload = await client.upload(b"async input\n", "in.txt")
            job = await client.submit(
                {
                    "image": SAMPLE_IMAGE,
                    "command": ["sh", "-c", "cat /inputs/in.txt; cp /inputs/in.txt /outputs/"],
                    "inputs": [{"file_id": upload.file_id, "path": "in.txt"}],
                    "max_duration_s": 60,
                    "max_price_per_gpu_hour": 1,
                }
            )
            lines = [e.line async for e in client.events(job.id) if isinstance(e, LogEvent)]
            async with asyncio.timeout(60):
                ended = await client.wait(job.id, poll_s=0.2)
            [path] = await client.download_outputs(job.id, tmp_path)
            return ended, lines, path.read_bytes()

    ended, lines, output = asyncio.run(run())
    assert ended.status == "succeeded"
    assert lines == ["async input"]
    assert output == b"async input\n"
