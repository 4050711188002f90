import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from common.errors import TooManyRequests, Unauthorized
from common.http import install_common
from common.logging import JsonFormatter
from common.request_context import request_id
from common.settings import ServiceSettings
from gateway.clients import ServiceClient

LIMIT = 1024


class Item(BaseModel):
    name: str


def make_app(**kwargs: object) -> FastAPI:
    app = FastAPI()
    install_common(app, "test", **kwargs)  # type: ignore[arg-type]
    app.state.reached = []
    app.state.release = asyncio.Event()

    @app.get("/whoami")
    async def whoami() -> dict:
        return {"request_id": request_id.get()}

    @app.get("/log")
    async def log() -> dict:
        logging.getLogger("tests.http").info("handling")
        return {}

    @app.post("/items")
    async def items(item: Item) -> dict:
        app.state.reached.append("items")
        return {"name": item.name}

    @app.post("/raw")
    async def raw(request: Request) -> dict:
        app.state.reached.append("raw")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    @app.get("/limited")
    async def limited() -> dict:
        raise TooManyRequests("slow down", retry_after=7)

    @app.get("/unauthorized")
    async def unauthorized() -> dict:
        raise Unauthorized("token required")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    async def gated() -> AsyncIterator[str]:
        # The second part waits for the client to have read the first: a buffering
        # middleware would never let the client see it.
        yield "first\n"
        await app.state.release.wait()
        yield "second\n"

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(gated(), media_type="text/plain")

    @app.get("/sse")
    async def sse() -> EventSourceResponse:
        async def events() -> AsyncIterator[dict]:
            async for part in gated():
                yield {"data": part.strip()}

        return EventSourceResponse(events())

    return app


def client_for(app: FastAPI, **transport: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport),  # type: ignore[arg-type]
        base_url="http://test",
    )


async def chunks(size: int, count: int, sent: list[int] | None = None) -> AsyncIterator[bytes]:
    for _ in range(count):
        if sent is not None:
            sent.append(size)
        yield b"x" * size


class TestRequestId:
    async def test_generated_when_absent(self) -> None:
        async with client_for(make_app()) as client:
            response = await client.get("/whoami")
        rid = response.headers["X-Request-ID"]
        assert len(rid) == 32 and int(rid, 16) >= 0
        assert response.json() == {"request_id": rid}
        assert request_id.get() is None

    async def test_valid_incoming_id_is_kept_and_echoed(self) -> None:
        async with client_for(make_app()) as client:
            response = await client.get("/whoami", headers={"X-Request-ID": "abc.DEF_1:2-3"})
        assert response.headers["X-Request-ID"] == "abc.DEF_1:2-3"
        assert response.json() == {"request_id": "abc.DEF_1:2-3"}

    @pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "é", ""])
    async def test_invalid_incoming_id_is_replaced(self, bad: str) -> None:
        async with client_for(make_app()) as client:
            response = await client.get("/whoami", headers={"X-Request-ID": bad.encode()})
        rid = response.headers["X-Request-ID"]
        assert rid != bad and len(rid) == 32
        assert response.json() == {"request_id": rid}

    async def test_each_request_gets_its_own(self) -> None:
        async with client_for(make_app()) as client:
            first = await client.get("/whoami")
            second = await client.get("/whoami")
        assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]

    async def test_error_responses_carry_it(self) -> None:
        async with client_for(make_app()) as client:
            not_found = await client.get("/nowhere", headers={"X-Request-ID": "r-404"})
            invalid = await client.post("/items", json={}, headers={"X-Request-ID": "r-422"})
        assert not_found.status_code == 404 and not_found.headers["X-Request-ID"] == "r-404"
        assert invalid.status_code == 422 and invalid.headers["X-Request-ID"] == "r-422"

    async def test_unhandled_error_answers_500_with_the_id(self) -> None:
        app = make_app()
        async with client_for(app, raise_app_exceptions=False) as client:
            response = await client.get("/boom", headers={"X-Request-ID": "r-500"})
        assert response.status_code == 500
        assert response.headers["X-Request-ID"] == "r-500"
        assert response.json() == {"detail": "internal server error"}

    async def test_log_lines_during_the_request_carry_it(self) -> None:
        lines: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(self.format(record))

        handler = Collect()
        handler.setFormatter(JsonFormatter("test"))
        logger = logging.getLogger("tests.http")
        logger.addHandler(handler)
        try:
            async with client_for(make_app()) as client:
                response = await client.get("/log")
            logger.info("after the request")
        finally:
            logger.removeHandler(handler)
        during, after = (json.loads(line) for line in lines)
        assert during["msg"] == "handling"
        assert during["request_id"] == response.headers["X-Request-ID"]
        assert "request_id" not in after


class TestServiceClientForwardsRequestId:
    async def test_header_sent_inside_a_request_only(self) -> None:
        seen: list[str | None] = []

        def upstream(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers.get("X-Request-ID"))
            return httpx.Response(200, json={})

        client = ServiceClient(
            "svc", "http://svc", "token", transport=httpx.MockTransport(upstream)
        )
        token = request_id.set("req-1")
        try:
            await client.request("GET", "/x")
        finally:
            request_id.reset(token)
        await client.request("GET", "/x")
        await client.aclose()
        assert seen == ["req-1", None]

    async def test_one_id_across_two_services(self) -> None:
        upstream = make_app()
        service = ServiceClient(
            "upstream", "http://upstream", "token", transport=httpx.ASGITransport(app=upstream)
        )
        front = FastAPI()
        install_common(front, "front")

        @front.get("/relay")
        async def relay() -> dict:
            return {"upstream": await service.request("GET", "/whoami")}

        async with client_for(front) as client:
            response = await client.get("/relay", headers={"X-Request-ID": "corr-42"})
        await service.aclose()
        assert response.headers["X-Request-ID"] == "corr-42"
        assert response.json() == {"upstream": {"request_id": "corr-42"}}


class TestBodyLimit:
    async def test_declared_length_over_the_limit(self) -> None:
        app = make_app(max_request_body_bytes=LIMIT)
        async with client_for(app) as client:
            response = await client.post("/raw", content=b"x" * (LIMIT + 1))
        assert response.status_code == 413
        body = response.json()
        assert body["detail"] == f"request body is larger than {LIMIT} bytes"
        assert body["errors"] == [{"field": "body", "reason": body["detail"]}]
        assert "X-Request-ID" in response.headers
        assert app.state.reached == []

    async def test_body_at_the_limit_passes(self) -> None:
        async with client_for(make_app(max_request_body_bytes=LIMIT)) as client:
            response = await client.post("/raw", content=b"x" * LIMIT)
        assert response.status_code == 200 and response.json() == {"size": LIMIT}

    async def test_normal_json_body(self) -> None:
        async with client_for(make_app(max_request_body_bytes=LIMIT)) as client:
            response = await client.post("/items", json={"name": "gpu"})
        assert response.status_code == 200 and response.json() == {"name": "gpu"}

    @pytest.mark.parametrize("path", ["/raw", "/items"])
    async def test_chunked_body_over_the_limit_is_cut_short(self, path: str) -> None:
        sent: list[int] = []
        async with client_for(make_app(max_request_body_bytes=LIMIT)) as client:
            response = await client.post(path, content=chunks(256, 400, sent))
        assert response.status_code == 413
        assert response.json()["errors"][0]["field"] == "body"
        # Counted as it arrived: reading stopped just past the limit, not at the end.
        assert sum(sent) <= LIMIT + 256

    async def test_chunked_body_under_the_limit(self) -> None:
        async with client_for(make_app(max_request_body_bytes=LIMIT)) as client:
            response = await client.post("/raw", content=chunks(256, 4))
        assert response.status_code == 200 and response.json() == {"size": LIMIT}

    async def test_default_limit_is_one_mebibyte(self) -> None:
        async with client_for(make_app()) as client:
            ok = await client.post("/raw", content=b"x" * 1_048_576)
            too_large = await client.post("/raw", content=b"x" * 1_048_577)
        assert ok.status_code == 200 and too_large.status_code == 413

    async def test_none_means_no_limit(self) -> None:
        async with client_for(make_app(max_request_body_bytes=None)) as client:
            response = await client.post("/raw", content=b"x" * 2_000_000)
        assert response.status_code == 200

    def test_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert ServiceSettings(dev_mode=True).max_request_body_bytes == 1_048_576
        monkeypatch.setenv("GPUMARKET_MAX_REQUEST_BODY_BYTES", "2048")
        assert ServiceSettings(dev_mode=True).max_request_body_bytes == 2048


class TestDomainErrorHeaders:
    async def test_too_many_requests_sends_retry_after(self) -> None:
        async with client_for(make_app()) as client:
            response = await client.get("/limited")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "7"
        assert response.json() == {"detail": "slow down"}

    async def test_unauthorized_still_asks_for_a_bearer_token(self) -> None:
        async with client_for(make_app()) as client:
            response = await client.get("/unauthorized")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "Retry-After" not in response.headers


@pytest.fixture
async def served() -> AsyncIterator[tuple[FastAPI, str]]:
    """The test app behind a real uvicorn on a free port: ASGITransport buffers responses."""
    app = make_app(max_request_body_bytes=LIMIT)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None)
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                task.result()  # the server failed to start: raise its error
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class TestOverTheNetwork:
    @pytest.mark.parametrize("path", ["/stream", "/sse"])
    async def test_streamed_responses_are_not_buffered(
        self, served: tuple[FastAPI, str], path: str
    ) -> None:
        app, url = served
        async with httpx.AsyncClient(base_url=url) as client, asyncio.timeout(10):
            async with client.stream("GET", path, headers={"X-Request-ID": "s-1"}) as response:
                assert response.headers["X-Request-ID"] == "s-1"
                lines = _nonblank(response.aiter_lines())
                assert "first" in await anext(lines)
                app.state.release.set()
                rest = [line async for line in lines]
        assert any("second" in line for line in rest)

    async def test_chunked_upload_over_the_limit(self, served: tuple[FastAPI, str]) -> None:
        _, url = served
        async with httpx.AsyncClient(base_url=url) as client:
            too_large = await client.post("/raw", content=chunks(256, 400))
            ok = await client.post("/raw", content=chunks(256, 2))
            declared = await client.post("/raw", content=b"x" * (LIMIT * 4))
        assert too_large.status_code == 413
        assert ok.status_code == 200 and ok.json() == {"size": 512}
        assert declared.status_code == 413


async def _nonblank(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.strip():
            yield line


class TestRequestMetrics:
    """Counted per route template and status, with latency to the response's start."""

    @staticmethod
    def count(route: str, status: str, method: str = "GET") -> float:
        labels = {"service": "metrics-test", "method": method, "route": route, "status": status}
        return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0

    async def test_routes_statuses_and_errors(self) -> None:
        app = FastAPI()
        install_common(app, "metrics-test")

        @app.get("/things/{thing_id}")
        async def thing(thing_id: int) -> dict:
            return {"id": thing_id}

        @app.get("/broken")
        async def broken() -> dict:
            raise RuntimeError("boom")

        before = {
            key: self.count(*key)
            for key in [
                ("/things/{thing_id}", "200"),
                ("/things/{thing_id}", "422"),
                ("unmatched", "404"),
                ("/broken", "500"),
            ]
        }
        async with client_for(app, raise_app_exceptions=False) as client:
            assert (await client.get("/things/1")).status_code == 200
            assert (await client.get("/things/2")).status_code == 200
            assert (await client.get("/things/x")).status_code == 422
            assert (await client.get("/nowhere")).status_code == 404
            assert (await client.get("/broken")).status_code == 500
        after = {key: self.count(*key) for key in before}
        assert {key: after[key] - before[key] for key in before} == {
            ("/things/{thing_id}", "200"): 2,
            ("/things/{thing_id}", "422"): 1,
            ("unmatched", "404"): 1,
            ("/broken", "500"): 1,
        }
        latency = REGISTRY.get_sample_value(
            "http_request_duration_seconds_count",
            {"service": "metrics-test", "method": "GET", "route": "/things/{thing_id}"},
        )
        assert latency is not None and latency >= 3

    async def test_a_stream_is_timed_to_its_start(self, served: tuple[FastAPI, str]) -> None:
        app, url = served
        labels = {"service": "test", "method": "GET", "route": "/stream"}
        before = REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0
        async with httpx.AsyncClient(base_url=url) as client, asyncio.timeout(10):
            async with client.stream("GET", "/stream") as response:
                lines = _nonblank(response.aiter_lines())
                assert "first" in await anext(lines)
                # Headers went out: timed already, while the body is still open.
                after = REGISTRY.get_sample_value("http_request_duration_seconds_count", labels)
                assert after == before + 1
                app.state.release.set()
                assert any(["second" in line async for line in lines])
