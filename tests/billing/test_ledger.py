"""The ledger on a real PostgreSQL: pairs that sum to zero, immutable, idempotent, and
balances that only ever follow the entries."""

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing import funding, ledger
from billing.holds import Hold, InsufficientFunds, place_holds
from billing.models import AVAILABLE, FUNDING, HELD, PLATFORM, Account, Entry, Transfer
from billing.reports import balance


async def credited(db: async_sessionmaker, amount: str = "10") -> str:
    owner = str(uuid.uuid4())
    async with db.begin() as session:
        await funding.add_credits(session, owner, Decimal(amount), reference=owner)
    return owner


async def test_a_credit_is_a_pair_of_entries_summing_to_zero(db: async_sessionmaker) -> None:
    owner = await credited(db, "12.5")
    async with db() as session:
        assert (await balance(session, owner)).available == Decimal("12.5")
        entries = (await session.scalars(select(Entry))).all()
        assert sorted(e.amount for e in entries) == [Decimal("-12.5"), Decimal("12.5")]
        funding_balance = await session.scalar(
            select(Account.balance).where(Account.kind == FUNDING, Account.owner_id == PLATFORM)
        )
        assert funding_balance == Decimal("-12.5")


async def test_a_reference_credits_once(db: async_sessionmaker) -> None:
    owner = str(uuid.uuid4())
    for _ in range(3):
        async with db.begin() as session:
            result = await funding.add_credits(session, owner, Decimal(5), reference="inv-1")
    assert not result.credited
    assert result.balance == Decimal(5)
    async with db() as session:
        assert await session.scalar(select(func.count()).select_from(Transfer)) == 1


async def test_ledger_rows_cannot_be_changed_or_deleted(db: async_sessionmaker) -> None:
    await credited(db)
    for statement in (
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_transfers SET amount = 1",
        "DELETE FROM billing_accounts",
    ):
        with pytest.raises(DBAPIError, match=r"immutable|never deleted"):
            async with db.begin() as session:
                await session.execute(text(statement))


async def test_a_balance_changes_only_through_entries(db: async_sessionmaker) -> None:
    owner = await credited(db)
    with pytest.raises(DBAPIError, match="only through ledger entries"):
        async with db.begin() as session:
            await session.execute(
                update(Account).where(Account.owner_id == owner).values(balance=1_000_000)
            )


async def test_an_unbalanced_transfer_is_refused_at_commit(db: async_sessionmaker) -> None:
    owner = await credited(db)
    with pytest.raises(DBAPIError, match="does not balance"):
        async with db.begin() as session:
            ids = (await ledger.lock(session, [(AVAILABLE, owner), (HELD, owner)])).ids
            transfer = Transfer(key="forged", kind="hold", amount=Decimal(3))
            session.add(transfer)
            await session.flush()
            session.add(Entry(transfer_id=transfer.id, account_id=ids[(HELD, owner)], amount=3))
    async with db() as session:
        assert (await balance(session, owner)).held == 0


async def test_no_account_of_a_requester_goes_below_zero(db: async_sessionmaker) -> None:
    owner = await credited(db, "1")
    with pytest.raises(DBAPIError, match="no_overdraft"):
        async with db.begin() as session:
            ids = (await ledger.lock(session, [(AVAILABLE, owner), (HELD, owner)])).ids
            await ledger.post(
                session,
                [
                    ledger.Posting(
                        "x", "hold", ids[(AVAILABLE, owner)], ids[(HELD, owner)], Decimal(2)
                    )
                ],
            )


async def test_holds_that_are_not_covered_write_nothing(db: async_sessionmaker) -> None:
    owner = await credited(db, "10")
    holds = [Hold(str(uuid.uuid4()), Decimal("4")) for _ in range(3)]
    with pytest.raises(InsufficientFunds) as refused:
        async with db.begin() as session:
            await place_holds(session, owner, holds)
    assert refused.value.status_code == 402
    assert (refused.value.required, refused.value.missing) == (Decimal(12), Decimal(2))
    assert "2.00 more credits are needed" in refused.value.detail
    async with db.begin() as session:
        await place_holds(session, owner, holds[:2])
    async with db() as session:
        money = await balance(session, owner)
    assert (money.available, money.held) == (Decimal(2), Decimal(8))


async def test_many_postings_update_each_account_once(db: async_sessionmaker) -> None:
    """One statement for all the entries: the balance trigger runs once per statement, so
    fifty transfers between two accounts update each of them once, not fifty times."""
    owner = await credited(db, "100")
    async with db.begin() as session:
        locked = await ledger.lock(session, [(AVAILABLE, owner), (HELD, owner)])
        source, target = locked.ids[(AVAILABLE, owner)], locked.ids[(HELD, owner)]
        before = await _accounts_updated(session)
        postings = [
            ledger.Posting(f"{owner}-{i}", "hold", source, target, Decimal("0.5"))
            for i in range(50)
        ]
        assert len(await ledger.post(session, postings)) == 50
        assert await _accounts_updated(session) - before == 2
    async with db() as session:
        assert (await balance(session, owner)).available == Decimal(75)
        assert (await balance(session, owner)).held == Decimal(25)


async def _accounts_updated(session: AsyncSession) -> int:
    """Rows of billing_accounts this transaction updated (or locked) so far."""
    query = "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'billing_accounts'"
    return int(await session.scalar(text(query)))
