"""Every call of the public REST API, described once: method, path, body, and how the
answer is read. `Client` and `AsyncClient` only send these, so both stay in step with
each other and with the gateway, whose own pydantic schemas type the bodies."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from auth_service.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    JoinTokenOut,
    LoginRequest,
    LogoutRequest,
    RefreshRequest,
    RegisterRequest,
    RevokedOut,
    SigningKeyOut,
    TokenOut,
    UserOut,
)
from billing.schemas import (
    AccountName,
    BalanceOut,
    CreditOut,
    CreditRequest,
    EarningsOut,
    LedgerPage,
    TotalsOut,
)
from gateway.schemas import FileCreateRequest, JobArrayOut, JobArrayRequest, OutputOut
from provider_registry.schemas import OfferFilters, OfferPage, PriceChange, ProviderOut
from scheduler.schemas import JobOut, JobSpec
from storage_service.schemas import FileOut, FileUpload, Usage

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    body: BaseModel | None = None
    # Sent without the bearer token (register, login, refresh).
    anonymous: bool = False

    def json(self) -> Any:
        return None if self.body is None else self.body.model_dump(mode="json", exclude_unset=True)


def one(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def many(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda response: adapter.validate_json(response.content)


def text(response: httpx.Response) -> str:
    return response.text


def nothing(_: httpx.Response) -> None:
    return None


def _query(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _job_spec(spec: JobSpec | dict[str, Any]) -> JobSpec:
    # A dict is checked here, so a bad spec fails before it leaves the machine.
    return spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)


# --- auth and keys ---


def register(email: str, password: str, roles: list[str]) -> Call[UserOut]:
    body = RegisterRequest.model_validate({"email": email, "password": password, "roles": roles})
    return Call("POST", "/v1/auth/register", one(UserOut), body=body, anonymous=True)


def login(email: str, password: str) -> Call[TokenOut]:
    body = LoginRequest(email=email, password=password)
    return Call("POST", "/v1/auth/login", one(TokenOut), body=body, anonymous=True)


def refresh(refresh_token: str) -> Call[TokenOut]:
    body = RefreshRequest(refresh_token=refresh_token)
    return Call("POST", "/v1/auth/refresh", one(TokenOut), body=body, anonymous=True)


def logout(everywhere: bool = False) -> Call[None]:
    return Call("POST", "/v1/auth/logout", nothing, body=LogoutRequest(everywhere=everywhere))


def me() -> Call[UserOut]:
    return Call("GET", "/v1/me", one(UserOut))


def create_api_key(
    name: str, roles: list[str] | None = None, expires_in_days: int | None = None
) -> Call[ApiKeyCreated]:
    body = ApiKeyCreate.model_validate(
        _query(name=name, roles=roles, expires_in_days=expires_in_days)
    )
    return Call("POST", "/v1/api-keys", one(ApiKeyCreated), body=body)


def api_keys() -> Call[list[ApiKeyOut]]:
    return Call("GET", "/v1/api-keys", many(ApiKeyOut))


def revoke_api_key(key_id: str) -> Call[ApiKeyOut]:
    return Call("DELETE", f"/v1/api-keys/{key_id}", one(ApiKeyOut))


# --- files ---


def create_file(filename: str, size: int, sha256: str) -> Call[FileUpload]:
    body = FileCreateRequest(filename=filename, size=size, sha256=sha256)
    return Call("POST", "/v1/files", one(FileUpload), body=body)


def file(file_id: str) -> Call[FileOut]:
    return Call("GET", f"/v1/files/{file_id}", one(FileOut))


def delete_file(file_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/files/{file_id}", nothing)


def storage_usage() -> Call[Usage]:
    return Call("GET", "/v1/files/usage", one(Usage))


# --- jobs ---


def submit(spec: JobSpec | dict[str, Any]) -> Call[JobOut]:
    return Call("POST", "/v1/jobs", one(JobOut), body=_job_spec(spec))


def submit_array(
    jobs: list[JobSpec | dict[str, Any]] | None = None,
    template: JobSpec | dict[str, Any] | None = None,
    count: int | None = None,
) -> Call[JobArrayOut]:
    body = JobArrayRequest(
        jobs=None if jobs is None else [_job_spec(s) for s in jobs],
        template=None if template is None else _job_spec(template),
        count=count,
    )
    return Call("POST", "/v1/jobs/batch", one(JobArrayOut), body=body)


def jobs(
    status: str | None = None, array: str | uuid.UUID | None = None, limit: int | None = None
) -> Call[list[JobOut]]:
    params = _query(status=status, array=None if array is None else str(array), limit=limit)
    return Call("GET", "/v1/jobs", many(JobOut), params=params)


def job(job_id: str) -> Call[JobOut]:
    return Call("GET", f"/v1/jobs/{job_id}", one(JobOut))


def cancel(job_id: str) -> Call[JobOut]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", one(JobOut))


def logs(job_id: str) -> Call[str]:
    return Call("GET", f"/v1/jobs/{job_id}/logs", text)


def outputs(job_id: str) -> Call[list[OutputOut]]:
    return Call("GET", f"/v1/jobs/{job_id}/outputs", many(OutputOut))


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


# --- the market and machines ---


def offers(filters: OfferFilters | None = None, **criteria: Any) -> Call[OfferPage]:
    """`criteria` are OfferFilters' fields (model=["H100"], min_gpus=2, label=["k=v"], ...)."""
    filters = filters or OfferFilters.model_validate(criteria)
    params = filters.model_dump(mode="json", exclude_defaults=True)
    return Call("GET", "/v1/offers", one(OfferPage), params=params)


def create_join_token() -> Call[JoinTokenOut]:
    return Call("POST", "/v1/providers/join-tokens", one(JoinTokenOut))


def providers() -> Call[list[ProviderOut]]:
    return Call("GET", "/v1/providers", many(ProviderOut))


def provider(provider_id: str) -> Call[ProviderOut]:
    return Call("GET", f"/v1/providers/{provider_id}", one(ProviderOut))


def drain_provider(provider_id: str) -> Call[ProviderOut]:
    return Call("POST", f"/v1/providers/{provider_id}/drain", one(ProviderOut))


def resume_provider(provider_id: str) -> Call[ProviderOut]:
    return Call("POST", f"/v1/providers/{provider_id}/resume", one(ProviderOut))


def set_prices(provider_id: str, prices: dict[str, Decimal | str | float]) -> Call[ProviderOut]:
    body = PriceChange.model_validate({"prices": prices})
    return Call("PUT", f"/v1/providers/{provider_id}/prices", one(ProviderOut), body=body)


def revoke_provider_credentials(provider_id: str) -> Call[RevokedOut]:
    return Call("POST", f"/v1/providers/{provider_id}/credentials/revoke", one(RevokedOut))


# --- money ---


def balance(user_id: str | None = None) -> Call[BalanceOut]:
    return Call("GET", "/v1/billing/balance", one(BalanceOut), params=_query(user_id=user_id))


def ledger(
    account: AccountName | None = None,
    before: int | None = None,
    limit: int | None = None,
    user_id: str | None = None,
) -> Call[LedgerPage]:
    params = _query(account=account, before=before, limit=limit, user_id=user_id)
    return Call("GET", "/v1/billing/ledger", one(LedgerPage), params=params)


def ledger_csv(
    account: AccountName | None = None,
    before: int | None = None,
    limit: int | None = None,
    user_id: str | None = None,
) -> Call[str]:
    params = _query(account=account, before=before, limit=limit, user_id=user_id, format="csv")
    return Call("GET", "/v1/billing/ledger", text, params=params)


def earnings(user_id: str | None = None) -> Call[EarningsOut]:
    return Call("GET", "/v1/billing/earnings", one(EarningsOut), params=_query(user_id=user_id))


# --- admin ---


def users(limit: int | None = None, offset: int | None = None) -> Call[list[UserOut]]:
    return Call("GET", "/v1/admin/users", many(UserOut), params=_query(limit=limit, offset=offset))


def set_user_disabled(user_id: str, disabled: bool) -> Call[UserOut]:
    action = "disable" if disabled else "enable"
    return Call("POST", f"/v1/admin/users/{user_id}/{action}", one(UserOut))


def rotate_signing_key() -> Call[SigningKeyOut]:
    return Call("POST", "/v1/admin/signing-keys/rotate", one(SigningKeyOut))


def credit(
    user_id: str,
    amount: Decimal | str | int,
    reference: str | None = None,
    memo: str | None = None,
) -> Call[CreditOut]:
    body = CreditRequest.model_validate(
        _query(user_id=user_id, amount=amount, reference=reference, memo=memo)
    )
    return Call("POST", "/v1/admin/billing/credits", one(CreditOut), body=body)


def billing_totals() -> Call[TotalsOut]:
    return Call("GET", "/v1/admin/billing/totals", one(TotalsOut))
