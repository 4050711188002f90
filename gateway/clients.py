"""HTTP clients for the services behind the gateway; their 4xx answers pass through."""

from typing import Any

import httpx

from common.discovery import NoHealthyInstance, ServiceResolver
from common.errors import DomainError
from common.request_context import REQUEST_ID_HEADER, request_id


class UpstreamError(DomainError):
    """A 4xx from a service behind the gateway, returned to the caller as it was."""

    def __init__(self, status_code: int, body: Any, retry_after: str | None = None) -> None:
        detail = body.get("detail") if isinstance(body, dict) else str(body)
        super().__init__(str(detail))
        self.status_code = status_code
        self._body = body if isinstance(body, dict) else {"detail": detail}
        self.retry_after = retry_after

    def body(self) -> dict:
        return self._body

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return headers


class ServiceUnavailable(DomainError):
    status_code = 503


# uvicorn closes a connection idle for 5 s (its timeout_keep_alive). A pooled connection
# reused at that instant is closed under the request ("Server disconnected without
# sending a response"), so ours are dropped sooner, and a read that met the race anyway
# is sent once more on a fresh connection.
KEEPALIVE_EXPIRY_S = 3.0
RETRIED_ON_DISCONNECT = frozenset({"GET", "HEAD", "OPTIONS"})


async def _forward_request_id(request: httpx.Request) -> None:
    # The service's logs then carry the same request id as the gateway's.
    rid = request_id.get()
    if rid is not None and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = rid


class ServiceClient:
    """Calls one service by name: at its Consul-registered instances when a resolver is
    given and Consul is configured, else at base_url."""

    def __init__(
        self,
        name: str,
        base_url: str,
        internal_token: str,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: ServiceResolver | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.resolver = resolver
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, connect=3.0),
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
            headers={"X-Internal-Token": internal_token},
            event_hooks={"request": [_forward_request_id]},
            transport=transport,
        )

    async def _url(self, path: str) -> str:
        if self.resolver is None:
            return self.base_url + path
        try:
            return await self.resolver.base_url(self.name, self.base_url) + path
        except NoHealthyInstance as exc:
            raise ServiceUnavailable(str(exc)) from exc

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer (None for 204); 4xx pass through as UpstreamError, the rest is 503."""
        url = await self._url(path)
        try:
            try:
                response = await self.http.request(method, url, **kwargs)
            except httpx.RemoteProtocolError:
                if method not in RETRIED_ON_DISCONNECT:
                    raise
                response = await self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{self.name} is unreachable: {exc}") from exc
        if 400 <= response.status_code < 500:
            raise UpstreamError(
                response.status_code,
                _json_or_text(response),
                retry_after=response.headers.get("Retry-After"),
            )
        if response.status_code >= 500:
            raise ServiceUnavailable(f"{self.name} failed with {response.status_code}")
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    async def aclose(self) -> None:
        await self.http.aclose()


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text}
