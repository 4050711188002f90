"""HTTP clients for the services behind the gateway; their 4xx answers pass through."""

from typing import Any

import httpx

from common.errors import DomainError


class UpstreamError(DomainError):
    """A 4xx from a service behind the gateway, returned to the caller as it was."""

    def __init__(self, status_code: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else str(body)
        super().__init__(str(detail))
        self.status_code = status_code
        self._body = body if isinstance(body, dict) else {"detail": detail}

    def body(self) -> dict:
        return self._body


class ServiceUnavailable(DomainError):
    status_code = 503


class ServiceClient:
    def __init__(self, name: str, base_url: str, internal_token: str) -> None:
        self.name = name
        self.http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(10.0, connect=3.0),
            headers={"X-Internal-Token": internal_token},
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{self.name} is unreachable: {exc}") from exc
        if 400 <= response.status_code < 500:
            raise UpstreamError(response.status_code, _json_or_text(response))
        if response.status_code >= 500:
            raise ServiceUnavailable(f"{self.name} failed with {response.status_code}")
        return response.json()

    async def aclose(self) -> None:
        await self.http.aclose()


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text}
