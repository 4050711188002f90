"""Money as its owners see it: balance, statement (JSON or CSV), machines' earnings."""

import csv
import io
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing import reports
from billing.schemas import AccountName, BalanceOut, EarningsOut, LedgerPage
from common.errors import Forbidden
from gateway.api import deps
from gateway.security import Principal, current_principal, require

router = APIRouter(prefix="/v1/billing", tags=["billing"])

CSV_COLUMNS = [
    "id",
    "at",
    "account",
    "kind",
    "amount",
    "job_id",
    "attempt",
    "provider_id",
    "gpu_model",
    "memo",
]


def _whose(principal: Principal, user_id: str | None) -> str:
    """The caller's own money; an admin may look at anyone's."""
    if user_id is None or user_id == principal.id:
        return principal.id
    if not principal.is_admin:
        raise Forbidden("only an admin may read another user's billing", field="user_id")
    return user_id


@router.get("/balance", response_model=BalanceOut)
async def balance(
    user_id: str | None = Query(default=None, max_length=36, description="admins only"),
    principal: Principal = Depends(current_principal),
    db: async_sessionmaker = Depends(deps.db),
) -> BalanceOut:
    async with db() as session:
        return await reports.balance(session, _whose(principal, user_id))


@router.get("/ledger", response_model=LedgerPage, responses={200: {"content": {"text/csv": {}}}})
async def ledger(
    account: AccountName | None = Query(default=None, description="one account; all by default"),
    before: int | None = Query(default=None, ge=1, description="entries older than this id"),
    limit: int = Query(default=100, ge=1, le=10_000),
    format: Literal["json", "csv"] = Query(default="json"),
    user_id: str | None = Query(default=None, max_length=36, description="admins only"),
    principal: Principal = Depends(current_principal),
    db: async_sessionmaker = Depends(deps.db),
) -> LedgerPage | Response:
    """Every movement of the caller's credits, newest first, paged with `before`."""
    async with db() as session:
        page = await reports.ledger_page(
            session, _whose(principal, user_id), account, before, limit
        )
    if format == "json":
        return page
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for entry in page.entries:
        row = entry.model_dump(mode="json")
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    headers = {"Content-Disposition": 'attachment; filename="ledger.csv"'}
    if page.next_before is not None:
        headers["X-Next-Before"] = str(page.next_before)
    return Response(out.getvalue(), media_type="text/csv", headers=headers)


@router.get("/earnings", response_model=EarningsOut)
async def earnings(
    user_id: str | None = Query(default=None, max_length=36, description="admins only"),
    principal: Principal = Depends(require("provider")),
    db: async_sessionmaker = Depends(deps.db),
) -> EarningsOut:
    """What the caller's machines earned (after the platform's fee), per machine and month."""
    async with db() as session:
        return await reports.earnings(session, _whose(principal, user_id))
