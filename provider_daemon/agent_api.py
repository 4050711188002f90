"""The gateway's agent API as the daemon uses it: job inputs and presigned transfer URLs,
and the owner's commands about this machine (status, drain, prices, leave)."""

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from common.messages import OutputFile
from provider_daemon.errors import (
    CredentialRejected,
    DaemonError,
    InfrastructureError,
    OwnerDisabled,
)

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
T = TypeVar("T")


class _Response(BaseModel):
    # A newer gateway may add fields; the daemon takes what it knows.
    model_config = ConfigDict(extra="ignore")


class InputFile(_Response):
    file_id: str
    path: str
    size: int
    # None for files registered before checksums were required (not checked then).
    sha256: str | None = None
    download_url: str


class MultipartTarget(_Response):
    """Part n (from 1) is bytes [(n-1) x part_size, n x part_size) of the file."""

    upload_id: str
    part_size: int
    part_urls: list[str]


class UploadTarget(_Response):
    """A single PUT to upload_url, or the parts of a big file."""

    path: str
    upload_url: str | None = None
    multipart: MultipartTarget | None = None


class OutputsPlan(_Response):
    uploads: list[UploadTarget]
    log_upload_url: str
    expires_at: datetime | None = None


class ProviderStatus(_Response):
    """The platform's view of this machine (GET /v1/agent/provider), kept loose: the CLI
    shows it, the daemon only needs to know it is still accepted."""

    provider: dict[str, Any]
    running_tasks: list[dict[str, Any]]
    tasks_ended: int
    earned: str


class _Transient(Exception):
    """Worth another try: the connection failed or the server had a 5xx moment."""


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        return response.text.strip()[:300]


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 500:
        raise _Transient(f"{what}: HTTP {response.status_code}")
    if response.status_code >= 400:
        raise InfrastructureError(f"{what}: HTTP {response.status_code}: {_detail(response)}")


class AgentApi:
    """Calls under /v1/agent carry the provider's credential; presigned URLs carry none."""

    def __init__(
        self,
        api_url: str,
        credential: str,
        timeout_s: float = 60.0,
        attempts: int = 3,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.attempts = attempts
        self._auth = {"Authorization": f"Bearer {credential}"}
        # Presigned URLs are signed for exactly what is sent: no extra auth header there.
        self.client = httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await call()
            except (httpx.TransportError, _Transient) as exc:
                if attempt == self.attempts:
                    raise InfrastructureError(f"{what}: {exc or type(exc).__name__}") from None
                log.warning("%s failed (%s), retrying", what, exc or type(exc).__name__)
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def list_inputs(self, job_id: str, attempt: int) -> list[InputFile]:
        url = f"{self.api_url}/v1/agent/jobs/{job_id}/inputs"
        what = f"listing inputs of job {job_id}"

        async def call() -> list[InputFile]:
            response = await self.client.get(url, params={"attempt": attempt}, headers=self._auth)
            _check(response, what)
            return [InputFile.model_validate(item) for item in response.json()]

        try:
            return await self._retry(what, call)
        except (ValidationError, ValueError, TypeError) as exc:
            raise InfrastructureError(f"{what}: unexpected response: {exc}") from None

    async def download(
        self,
        url: str,
        dest: Path,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        name: str | None = None,
    ) -> int:
        """Streams one presigned URL to `dest`, hashing as it goes; returns the bytes
        written. Bytes of the wrong size or sha256 are fetched again (the transfer may
        have damaged them), then refused."""
        what = f"downloading input {name or dest.name}"

        async def call() -> int:
            written = 0
            digest = hashlib.sha256()
            async with self.client.stream("GET", url) as response:
                _check(response, what)
                with dest.open("wb") as f:
                    async for chunk in response.aiter_bytes(CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
            if expected_size is not None and written != expected_size:
                raise _Transient(f"got {written} bytes, expected {expected_size}")
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise _Transient(
                    f"the bytes have sha256 {digest.hexdigest()}, expected {expected_sha256}"
                )
            return written

        return await self._retry(what, call)

    async def plan_outputs(
        self, job_id: str, attempt: int, files: list[OutputFile], log_size: int | None = None
    ) -> OutputsPlan:
        url = f"{self.api_url}/v1/agent/jobs/{job_id}/outputs"
        what = f"registering outputs of job {job_id}"
        body: dict[str, Any] = {"attempt": attempt, "files": [f.model_dump() for f in files]}
        if log_size is not None:
            body["log_size"] = log_size

        async def call() -> OutputsPlan:
            response = await self.client.post(url, json=body, headers=self._auth)
            _check(response, what)
            return OutputsPlan.model_validate_json(response.content)

        try:
            return await self._retry(what, call)
        except ValidationError as exc:
            raise InfrastructureError(f"{what}: unexpected response: {exc}") from None

    async def upload(self, url: str, src: Path, content_type: str | None = None) -> None:
        """PUTs a file to a presigned URL without reading it into memory."""
        what = f"uploading {src.name}"

        async def body() -> AsyncIterator[bytes]:
            with src.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        size = await asyncio.to_thread(os.path.getsize, src)

        async def call() -> None:
            # An explicit length: S3 refuses chunked uploads to presigned PUT URLs.
            headers = {"Content-Length": str(size)}
            if content_type:
                headers["Content-Type"] = content_type
            response = await self.client.put(url, content=body(), headers=headers)
            _check(response, what)

        await self._retry(what, call)

    async def upload_part(self, url: str, src: Path, offset: int, length: int, what: str) -> str:
        """PUTs bytes [offset, offset + length) of a file to an UploadPart URL, read in
        chunks (a retry reads them again); returns the part's ETag."""

        async def body() -> AsyncIterator[bytes]:
            with src.open("rb") as f:
                f.seek(offset)
                left = length
                while left > 0 and (chunk := f.read(min(CHUNK, left))):
                    left -= len(chunk)
                    yield chunk

        async def call() -> str:
            headers = {"Content-Length": str(length)}
            response = await self.client.put(url, content=body(), headers=headers)
            _check(response, what)
            etag = response.headers.get("etag")
            if not etag:
                raise InfrastructureError(f"{what}: storage answered without an ETag")
            return etag

        return await self._retry(what, call)

    async def _upload_call(
        self, job_id: str, action: str, body: dict[str, Any], what: str
    ) -> httpx.Response:
        url = f"{self.api_url}/v1/agent/jobs/{job_id}/outputs/{action}"

        async def call() -> httpx.Response:
            response = await self.client.post(url, json=body, headers=self._auth)
            _check(response, what)
            return response

        return await self._retry(what, call)

    async def complete_upload(
        self, job_id: str, attempt: int, path: str, upload_id: str, etags: list[str]
    ) -> int:
        """Asks the platform to join the parts (etags[n - 1] is part n's); returns the
        object's size as stored."""
        parts = [{"part_number": n, "etag": etag} for n, etag in enumerate(etags, 1)]
        body = {"attempt": attempt, "path": path, "upload_id": upload_id, "parts": parts}
        what = f"completing the upload of {path}"
        response = await self._upload_call(job_id, "complete", body, what)
        try:
            return int(response.json()["size"])
        except (ValueError, KeyError, TypeError):
            raise InfrastructureError(f"{what}: unexpected response") from None

    async def abort_upload(self, job_id: str, attempt: int, path: str, upload_id: str) -> None:
        body = {"attempt": attempt, "path": path, "upload_id": upload_id}
        await self._upload_call(job_id, "abort", body, f"aborting the upload of {path}")

    # --- the machine itself ----------------------------------------------------------

    async def _machine_call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        """A call about this machine; 401 means the platform cut it off, anything else
        that fails is one clear DaemonError."""
        url = f"{self.api_url}/v1/agent/provider{path}"
        what = f"{method} {url}"

        async def call() -> dict[str, Any]:
            response = await self.client.request(method, url, json=json, headers=self._auth)
            if response.status_code == 401 and "disabled" in _detail(response):
                raise OwnerDisabled(
                    "the machine's owner account is disabled; it takes no work until an "
                    "admin enables it again"
                )
            if response.status_code == 401:
                raise CredentialRejected(
                    "the platform no longer accepts this machine's credential (it was "
                    "revoked, or the machine left); join again with a new token"
                )
            _check(response, what)
            body = response.json()
            if not isinstance(body, dict):
                raise InfrastructureError(f"{what}: unexpected response")
            return body

        try:
            return await self._retry(what, call)
        except InfrastructureError as exc:
            raise DaemonError(str(exc)) from None

    async def status(self) -> ProviderStatus:
        try:
            return ProviderStatus.model_validate(await self._machine_call("GET", ""))
        except ValidationError as exc:
            raise DaemonError(f"unexpected status from the platform: {exc}") from None

    async def drain(self) -> dict[str, Any]:
        return await self._machine_call("POST", "/drain")

    async def resume(self) -> dict[str, Any]:
        return await self._machine_call("POST", "/resume")

    async def set_prices(self, prices: dict[str, float]) -> dict[str, Any]:
        """New prices per GPU-hour by model; answers the machine as the platform has it."""
        return await self._machine_call("PUT", "/prices", json={"prices": prices})

    async def leave(self) -> dict[str, Any]:
        return await self._machine_call("POST", "/leave")
