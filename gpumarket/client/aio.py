"""The asynchronous client: the same calls as `Client`, awaited."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_retries import Retry, RetryTransport
from httpx_sse import aconnect_sse

from auth_service.schemas import (
    ApiKeyCreated,
    ApiKeyOut,
    JoinTokenOut,
    RevokedOut,
    SigningKeyOut,
    TokenOut,
    UserOut,
)
from billing.schemas import (
    AccountName,
    BalanceOut,
    CreditOut,
    EarningsOut,
    LedgerPage,
    TotalsOut,
)
from gateway.schemas import JobArrayOut, OutputOut
from gpumarket.client import calls
from gpumarket.client.base import (
    API_RETRY,
    STORAGE_RETRY,
    STORAGE_TIMEOUT,
    ClientBase,
    raw_body,
)
from gpumarket.client.calls import Call
from gpumarket.client.errors import ApiError
from gpumarket.client.events import EndEvent, JobEvent, Resume
from gpumarket.client.transfer import CHUNK, AsyncFileChunks, Download, Progress, Upload, refused
from provider_registry.schemas import OfferFilters, OfferPage, ProviderOut
from scheduler import states
from scheduler.schemas import JobOut, JobSpec
from storage_service.schemas import FileOut, FileUpload, Usage

T = TypeVar("T")


class AsyncClient(ClientBase):
    """`async with AsyncClient(api_url, token=...) as client:`; behaves as `Client`."""

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        refresh_token: str | None = None,
        timeout: float = 30.0,
        retry: Retry = API_RETRY,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` carries the calls (to the API and to storage) under the retries:
        httpx's own by default, a proxy's or a test's otherwise."""
        super().__init__(api_url, token, refresh_token, headers)
        self.http = httpx.AsyncClient(
            base_url=self.api_url,
            timeout=timeout,
            headers=self.headers,
            transport=RetryTransport(transport or httpx.AsyncHTTPTransport(), retry=retry),
        )
        self.storage = httpx.AsyncClient(
            timeout=STORAGE_TIMEOUT,
            transport=RetryTransport(transport or httpx.AsyncHTTPTransport(), retry=STORAGE_RETRY),
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.storage.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def send(self, call: Call[T]) -> T:
        response = await self._send(call)
        if self._should_refresh(call, response):
            await self.refresh()
            response = await self._send(call)
        if response.is_error:
            raise ApiError.from_response(response)
        return call.read(response)

    async def _send(self, call: Call[Any]) -> httpx.Response:
        return await self.http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json(),
            headers=self._headers(call),
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any route, untyped: the JSON answer (or text); ApiError on 4xx/5xx."""
        response = await self.http.request(method, path, headers=self._headers(), **kwargs)
        if response.is_error:
            raise ApiError.from_response(response)
        return raw_body(response)

    # --- auth and keys ---

    async def register(self, email: str, password: str, roles: str | list[str]) -> UserOut:
        return await self.send(
            calls.register(email, password, [roles] if isinstance(roles, str) else roles)
        )

    async def login(self, email: str, password: str) -> TokenOut:
        """Starts a session: this client then calls as that user."""
        return self._took(await self.send(calls.login(email, password)))

    async def register_or_login(
        self, email: str, password: str, roles: str | list[str]
    ) -> TokenOut:
        try:
            await self.register(email, password, roles)
        except ApiError as exc:
            if exc.status_code != 409:
                raise
        return await self.login(email, password)

    async def refresh(self) -> TokenOut:
        if not self.refresh_token:
            raise ValueError("this client has no refresh token (log in first)")
        return self._took(await self.send(calls.refresh(self.refresh_token)))

    async def logout(self, everywhere: bool = False) -> None:
        await self.send(calls.logout(everywhere))
        self.token = self.refresh_token = None

    async def me(self) -> UserOut:
        return await self.send(calls.me())

    async def create_api_key(
        self, name: str, roles: list[str] | None = None, expires_in_days: int | None = None
    ) -> ApiKeyCreated:
        return await self.send(calls.create_api_key(name, roles, expires_in_days))

    async def api_keys(self) -> list[ApiKeyOut]:
        return await self.send(calls.api_keys())

    async def revoke_api_key(self, key_id: str) -> ApiKeyOut:
        return await self.send(calls.revoke_api_key(key_id))

    # --- files ---

    async def upload(
        self, source: Path | bytes, filename: str | None = None, progress: Progress | None = None
    ) -> FileUpload:
        """Registers a file and PUTs its bytes (read in chunks) to its presigned URL."""
        upload = await asyncio.to_thread(Upload.of, source, filename, progress, AsyncFileChunks)
        record = await self.send(calls.create_file(upload.filename, upload.size, upload.sha256))
        response = await self.storage.put(
            record.upload_url, content=upload.content, headers={"Content-Length": str(upload.size)}
        )
        upload.sent(response, progress)
        return record

    async def file(self, file_id: str) -> FileOut:
        return await self.send(calls.file(file_id))

    async def delete_file(self, file_id: str) -> None:
        """Deletes an uploaded file, freeing its space in the storage quota."""
        await self.send(calls.delete_file(file_id))

    async def storage_usage(self) -> Usage:
        """Bytes stored (input files, job outputs and logs) against the quota."""
        return await self.send(calls.storage_usage())

    # --- jobs ---

    async def submit(self, spec: JobSpec | dict[str, Any]) -> JobOut:
        return await self.send(calls.submit(spec))

    async def submit_array(
        self,
        jobs: list[JobSpec | dict[str, Any]] | None = None,
        template: JobSpec | dict[str, Any] | None = None,
        count: int | None = None,
    ) -> JobArrayOut:
        return await self.send(calls.submit_array(jobs, template, count))

    async def jobs(
        self,
        status: str | None = None,
        array: str | uuid.UUID | None = None,
        limit: int | None = None,
    ) -> list[JobOut]:
        return await self.send(calls.jobs(status, array, limit))

    async def job(self, job_id: str) -> JobOut:
        return await self.send(calls.job(job_id))

    async def cancel(self, job_id: str) -> JobOut:
        return await self.send(calls.cancel(job_id))

    async def logs(self, job_id: str) -> str:
        return await self.send(calls.logs(job_id))

    async def outputs(self, job_id: str) -> list[OutputOut]:
        return await self.send(calls.outputs(job_id))

    async def wait(self, job_id: str, poll_s: float = 1.0) -> JobOut:
        """Polls until the job is over (bound it with `asyncio.timeout`)."""
        while True:
            job = await self.job(job_id)
            if job.status in states.TERMINAL and job.finished_at is not None:
                return job
            await asyncio.sleep(poll_s)

    async def events(self, job_id: str, *, read_timeout: float = 60.0) -> AsyncIterator[JobEvent]:
        """The job's status changes, log lines and image pulls, live, until it ends. A
        dropped connection is reopened without repeating what was already yielded."""
        resume = Resume()
        timeout = httpx.Timeout(self.http.timeout.connect or 30.0, read=read_timeout)
        path = calls.events_path(job_id)
        while True:
            error: httpx.TransportError | None = None
            try:
                async with aconnect_sse(
                    self.http, "GET", path, headers=self._headers(), timeout=timeout
                ) as source:
                    if source.response.is_error:
                        await source.response.aread()
                        raise ApiError.from_response(source.response)
                    resume.connected()
                    async for sse in source.aiter_sse():
                        if (event := resume.accept(sse.event, sse.data)) is not None:
                            yield event
                            if isinstance(event, EndEvent):
                                return
            except httpx.TransportError as exc:
                error = exc
            await asyncio.sleep(resume.dropped(error))

    async def download(
        self, output: OutputOut, root: Path, progress: Progress | None = None
    ) -> Path:
        """One output under `root` (its path kept), checked against its size and sha256;
        a file already there with the same bytes is not fetched again."""
        download = await asyncio.to_thread(Download.start, output, root, progress)
        if isinstance(download, Path):
            return download
        try:
            async with self.storage.stream("GET", output.download_url) as response:
                if response.is_error:
                    await response.aread()
                    raise refused(f"downloading {output.path}", response)
                async for chunk in response.aiter_bytes(CHUNK):
                    download.write(chunk)
            return download.finish()
        except BaseException:
            download.abort()
            raise

    async def download_outputs(
        self, job_id: str, root: Path, progress: Progress | None = None
    ) -> list[Path]:
        return [
            await self.download(output, root, progress) for output in await self.outputs(job_id)
        ]

    # --- the market and machines ---

    async def offers(self, filters: OfferFilters | None = None, **criteria: Any) -> OfferPage:
        return await self.send(calls.offers(filters, **criteria))

    async def create_join_token(self) -> JoinTokenOut:
        return await self.send(calls.create_join_token())

    async def providers(self) -> list[ProviderOut]:
        return await self.send(calls.providers())

    async def provider(self, provider_id: str) -> ProviderOut:
        return await self.send(calls.provider(provider_id))

    async def drain_provider(self, provider_id: str) -> ProviderOut:
        return await self.send(calls.drain_provider(provider_id))

    async def resume_provider(self, provider_id: str) -> ProviderOut:
        return await self.send(calls.resume_provider(provider_id))

    async def set_prices(
        self, provider_id: str, prices: dict[str, Decimal | str | float]
    ) -> ProviderOut:
        return await self.send(calls.set_prices(provider_id, prices))

    async def revoke_provider_credentials(self, provider_id: str) -> RevokedOut:
        return await self.send(calls.revoke_provider_credentials(provider_id))

    # --- money ---

    async def balance(self, user_id: str | None = None) -> BalanceOut:
        return await self.send(calls.balance(user_id))

    async def ledger(
        self,
        account: AccountName | None = None,
        before: int | None = None,
        limit: int | None = None,
        user_id: str | None = None,
    ) -> LedgerPage:
        return await self.send(calls.ledger(account, before, limit, user_id))

    async def ledger_csv(
        self,
        account: AccountName | None = None,
        before: int | None = None,
        limit: int | None = None,
        user_id: str | None = None,
    ) -> str:
        return await self.send(calls.ledger_csv(account, before, limit, user_id))

    async def earnings(self, user_id: str | None = None) -> EarningsOut:
        return await self.send(calls.earnings(user_id))

    # --- admin ---

    async def users(self, limit: int | None = None, offset: int | None = None) -> list[UserOut]:
        return await self.send(calls.users(limit, offset))

    async def disable_user(self, user_id: str) -> UserOut:
        return await self.send(calls.set_user_disabled(user_id, True))

    async def enable_user(self, user_id: str) -> UserOut:
        return await self.send(calls.set_user_disabled(user_id, False))

    async def rotate_signing_key(self) -> SigningKeyOut:
        return await self.send(calls.rotate_signing_key())

    async def credit(
        self,
        user_id: str,
        amount: Decimal | str | int,
        reference: str | None = None,
        memo: str | None = None,
    ) -> CreditOut:
        return await self.send(calls.credit(user_id, amount, reference, memo))

    async def billing_totals(self) -> TotalsOut:
        return await self.send(calls.billing_totals())
