"""The synchronous client: the whole public API, typed with the gateway's own schemas."""

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_retries import Retry, RetryTransport
from httpx_sse import connect_sse

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
from gpumarket.client.transfer import CHUNK, Download, Progress, Upload, refused
from provider_registry.schemas import OfferFilters, OfferPage, ProviderOut
from scheduler import states
from scheduler.schemas import JobOut, JobSpec
from storage_service.schemas import FileOut, FileUpload, Usage

T = TypeVar("T")


class Client(ClientBase):
    """`Client(api_url, token=...)`; a 429 or 503 is retried after the server's
    Retry-After, and a failed call raises ApiError (status, detail, field)."""

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        refresh_token: str | None = None,
        timeout: float = 30.0,
        retry: Retry = API_RETRY,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`transport` carries the calls (to the API and to storage) under the retries:
        httpx's own by default, a proxy's or a test's otherwise."""
        super().__init__(api_url, token, refresh_token, headers)
        self.http = httpx.Client(
            base_url=self.api_url,
            timeout=timeout,
            headers=self.headers,
            transport=RetryTransport(transport or httpx.HTTPTransport(), retry=retry),
        )
        self.storage = httpx.Client(
            timeout=STORAGE_TIMEOUT,
            transport=RetryTransport(transport or httpx.HTTPTransport(), retry=STORAGE_RETRY),
        )

    def close(self) -> None:
        self.http.close()
        self.storage.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, call: Call[T]) -> T:
        response = self._send(call)
        if self._should_refresh(call, response):
            self.refresh()
            response = self._send(call)
        if response.is_error:
            raise ApiError.from_response(response)
        return call.read(response)

    def _send(self, call: Call[Any]) -> httpx.Response:
        return self.http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json(),
            headers=self._headers(call),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any route, untyped: the JSON answer (or text); ApiError on 4xx/5xx."""
        response = self.http.request(method, path, headers=self._headers(), **kwargs)
        if response.is_error:
            raise ApiError.from_response(response)
        return raw_body(response)

    # --- auth and keys ---

    def register(self, email: str, password: str, roles: str | list[str]) -> UserOut:
        return self.send(
            calls.register(email, password, [roles] if isinstance(roles, str) else roles)
        )

    def login(self, email: str, password: str) -> TokenOut:
        """Starts a session: this client then calls as that user."""
        return self._took(self.send(calls.login(email, password)))

    def register_or_login(self, email: str, password: str, roles: str | list[str]) -> TokenOut:
        try:
            self.register(email, password, roles)
        except ApiError as exc:
            if exc.status_code != 409:
                raise
        return self.login(email, password)

    def refresh(self) -> TokenOut:
        if not self.refresh_token:
            raise ValueError("this client has no refresh token (log in first)")
        return self._took(self.send(calls.refresh(self.refresh_token)))

    def logout(self, everywhere: bool = False) -> None:
        self.send(calls.logout(everywhere))
        self.token = self.refresh_token = None

    def me(self) -> UserOut:
        return self.send(calls.me())

    def create_api_key(
        self, name: str, roles: list[str] | None = None, expires_in_days: int | None = None
    ) -> ApiKeyCreated:
        return self.send(calls.create_api_key(name, roles, expires_in_days))

    def api_keys(self) -> list[ApiKeyOut]:
        return self.send(calls.api_keys())

    def revoke_api_key(self, key_id: str) -> ApiKeyOut:
        return self.send(calls.revoke_api_key(key_id))

    # --- files ---

    def upload(
        self, source: Path | bytes, filename: str | None = None, progress: Progress | None = None
    ) -> FileUpload:
        """Registers a file and PUTs its bytes (read in chunks) to its presigned URL."""
        upload = Upload.of(source, filename, progress)
        record = self.send(calls.create_file(upload.filename, upload.size, upload.sha256))
        response = self.storage.put(
            record.upload_url, content=upload.content, headers={"Content-Length": str(upload.size)}
        )
        upload.sent(response, progress)
        return record

    def file(self, file_id: str) -> FileOut:
        return self.send(calls.file(file_id))

    def delete_file(self, file_id: str) -> None:
        """Deletes an uploaded file, freeing its space in the storage quota."""
        self.send(calls.delete_file(file_id))

    def storage_usage(self) -> Usage:
        """Bytes stored (input files, job outputs and logs) against the quota."""
        return self.send(calls.storage_usage())

    # --- jobs ---

    def submit(self, spec: JobSpec | dict[str, Any]) -> JobOut:
        return self.send(calls.submit(spec))

    def submit_array(
        self,
        jobs: list[JobSpec | dict[str, Any]] | None = None,
        template: JobSpec | dict[str, Any] | None = None,
        count: int | None = None,
    ) -> JobArrayOut:
        return self.send(calls.submit_array(jobs, template, count))

    def jobs(
        self,
        status: str | None = None,
        array: str | uuid.UUID | None = None,
        limit: int | None = None,
    ) -> list[JobOut]:
        return self.send(calls.jobs(status, array, limit))

    def job(self, job_id: str) -> JobOut:
        return self.send(calls.job(job_id))

    def cancel(self, job_id: str) -> JobOut:
        return self.send(calls.cancel(job_id))

    def logs(self, job_id: str) -> str:
        return self.send(calls.logs(job_id))

    def outputs(self, job_id: str) -> list[OutputOut]:
        return self.send(calls.outputs(job_id))

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> JobOut:
        """Polls until the job is over; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status in states.TERMINAL and job.finished_at is not None:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_s)

    def events(self, job_id: str, *, read_timeout: float = 60.0) -> Iterator[JobEvent]:
        """The job's status changes, log lines and image pulls, live, until it ends. A
        dropped connection is reopened without repeating what was already yielded."""
        resume = Resume()
        timeout = httpx.Timeout(self.http.timeout.connect or 30.0, read=read_timeout)
        path = calls.events_path(job_id)
        while True:
            error: httpx.TransportError | None = None
            try:
                with connect_sse(
                    self.http, "GET", path, headers=self._headers(), timeout=timeout
                ) as source:
                    if source.response.is_error:
                        source.response.read()
                        raise ApiError.from_response(source.response)
                    resume.connected()
                    for sse in source.iter_sse():
                        if (event := resume.accept(sse.event, sse.data)) is not None:
                            yield event
                            if isinstance(event, EndEvent):
                                return
            except httpx.TransportError as exc:
                error = exc
            time.sleep(resume.dropped(error))

    def download(self, output: OutputOut, root: Path, progress: Progress | None = None) -> Path:
        """One output under `root` (its path kept), checked against its size and sha256;
        a file already there with the same bytes is not fetched again."""
        download = Download.start(output, root, progress)
        if isinstance(download, Path):
            return download
        try:
            with self.storage.stream("GET", output.download_url) as response:
                if response.is_error:
                    response.read()
                    raise refused(f"downloading {output.path}", response)
                for chunk in response.iter_bytes(CHUNK):
                    download.write(chunk)
            return download.finish()
        except BaseException:
            download.abort()
            raise

    def download_outputs(
        self, job_id: str, root: Path, progress: Progress | None = None
    ) -> list[Path]:
        return [self.download(output, root, progress) for output in self.outputs(job_id)]

    # --- the market and machines ---

    def offers(self, filters: OfferFilters | None = None, **criteria: Any) -> OfferPage:
        return self.send(calls.offers(filters, **criteria))

    def create_join_token(self) -> JoinTokenOut:
        return self.send(calls.create_join_token())

    def providers(self) -> list[ProviderOut]:
        return self.send(calls.providers())

    def provider(self, provider_id: str) -> ProviderOut:
        return self.send(calls.provider(provider_id))

    def drain_provider(self, provider_id: str) -> ProviderOut:
        return self.send(calls.drain_provider(provider_id))

    def resume_provider(self, provider_id: str) -> ProviderOut:
        return self.send(calls.resume_provider(provider_id))

    def set_prices(self, provider_id: str, prices: dict[str, Decimal | str | float]) -> ProviderOut:
        return self.send(calls.set_prices(provider_id, prices))

    def revoke_provider_credentials(self, provider_id: str) -> RevokedOut:
        return self.send(calls.revoke_provider_credentials(provider_id))

    # --- money ---

    def balance(self, user_id: str | None = None) -> BalanceOut:
        return self.send(calls.balance(user_id))

    def ledger(
        self,
        account: AccountName | None = None,
        before: int | None = None,
        limit: int | None = None,
        user_id: str | None = None,
    ) -> LedgerPage:
        return self.send(calls.ledger(account, before, limit, user_id))

    def ledger_csv(
        self,
        account: AccountName | None = None,
        before: int | None = None,
        limit: int | None = None,
        user_id: str | None = None,
    ) -> str:
        return self.send(calls.ledger_csv(account, before, limit, user_id))

    def earnings(self, user_id: str | None = None) -> EarningsOut:
        return self.send(calls.earnings(user_id))

    # --- admin ---

    def users(self, limit: int | None = None, offset: int | None = None) -> list[UserOut]:
        return self.send(calls.users(limit, offset))

    def disable_user(self, user_id: str) -> UserOut:
        return self.send(calls.set_user_disabled(user_id, True))

    def enable_user(self, user_id: str) -> UserOut:
        return self.send(calls.set_user_disabled(user_id, False))

    def rotate_signing_key(self) -> SigningKeyOut:
        return self.send(calls.rotate_signing_key())

    def credit(
        self,
        user_id: str,
        amount: Decimal | str | int,
        reference: str | None = None,
        memo: str | None = None,
    ) -> CreditOut:
        return self.send(calls.credit(user_id, amount, reference, memo))

    def billing_totals(self) -> TotalsOut:
        return self.send(calls.billing_totals())
