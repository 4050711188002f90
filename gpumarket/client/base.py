"""What the sync and the async client share: retry policy, headers, token handling."""

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
from httpx_retries import Retry

from auth_service.schemas import TokenOut
from gpumarket.client.calls import Call

# 429 (a rate limit) and 503 (a service the gateway needs is down) mean the request was
# not carried out, so even a POST is safe to send again; the wait is the server's
# Retry-After when it gives one. A connection that never opened is safe to retry too;
# a timeout after sending is not (the job may have been queued).
API_RETRY = Retry(
    total=5,
    allowed_methods=["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"],
    status_forcelist=[429, 503],
    retry_on_exceptions=[httpx.ConnectError, httpx.ConnectTimeout],
    backoff_factor=0.5,
    max_backoff_wait=60,
)
# Presigned GETs and PUTs of whole objects are idempotent: retry what S3 calls transient.
STORAGE_RETRY = Retry(
    total=4,
    allowed_methods=["GET", "PUT"],
    status_forcelist=[500, 502, 503, 504],
    backoff_factor=0.5,
    max_backoff_wait=30,
)
# Transfers of big files may go quiet for a while (storage flushing a part) but not forever.
STORAGE_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def user_agent() -> str:
    try:
        ours = version("gpu-marketplace")
    except PackageNotFoundError:
        ours = "dev"
    return f"gpumarket-client/{ours} python/{platform.python_version()}"


class ClientBase:
    def __init__(
        self,
        api_url: str,
        token: str | None,
        refresh_token: str | None,
        headers: dict[str, str] | None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        # A session's access token (JWT) or an API key: both go as the bearer token.
        self.token = token
        # With one, an expired access token is renewed once and the call sent again.
        self.refresh_token = refresh_token
        self.headers = {"User-Agent": user_agent(), **(headers or {})}

    def _headers(self, call: Call[Any] | None = None) -> dict[str, str]:
        if self.token and not (call and call.anonymous):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def _should_refresh(self, call: Call[Any], response: httpx.Response) -> bool:
        return response.status_code == 401 and bool(self.refresh_token) and not call.anonymous

    def _took(self, tokens: TokenOut) -> TokenOut:
        self.token = tokens.access_token
        self.refresh_token = tokens.refresh_token
        return tokens


def raw_body(response: httpx.Response) -> Any:
    """The escape hatch's answer: JSON when it is JSON, else text (None for 204)."""
    if response.status_code == 204:
        return None
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text
