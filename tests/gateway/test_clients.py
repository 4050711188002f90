"""The gateway's client for the services behind it, when a pooled connection dies."""

import httpx
import pytest

from gateway.clients import ServiceClient, ServiceUnavailable


def closing_once() -> tuple[list[str], httpx.MockTransport]:
    """An upstream whose first request meets a connection closed under it (the race with
    uvicorn's keep-alive timeout), then answers normally."""
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"ok": True})

    return seen, httpx.MockTransport(upstream)


class TestDisconnectedConnection:
    async def test_a_read_is_sent_again(self) -> None:
        seen, transport = closing_once()
        client = ServiceClient("svc", "http://svc", "token", transport=transport)
        try:
            assert await client.request("GET", "/internal/usage") == {"ok": True}
        finally:
            await client.aclose()
        assert seen == ["GET", "GET"]

    async def test_a_write_is_not_repeated(self) -> None:
        seen, transport = closing_once()
        client = ServiceClient("svc", "http://svc", "token", transport=transport)
        try:
            with pytest.raises(ServiceUnavailable, match="svc is unreachable"):
                await client.request("POST", "/internal/uploads", json={})
        finally:
            await client.aclose()
        assert seen == ["POST"]

    async def test_pooled_connections_expire_before_uvicorn_closes_them(self) -> None:
        client = ServiceClient("svc", "http://svc", "token")
        try:
            pool = client.http._transport._pool  # type: ignore[attr-defined]
            # uvicorn's default timeout_keep_alive is 5 s.
            assert pool._keepalive_expiry < 5
        finally:
            await client.aclose()
