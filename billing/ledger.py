"""Posting to the double-entry ledger. Functions take the session; the caller owns the
transaction, and locks the accounts it moves money between (`lock`) before deciding."""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Select, String, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import Account, Entry, Transfer
from common.db import array_rows, insert_rows

AccountKey = tuple[str, str]  # (kind, owner_id)


@dataclass(frozen=True)
class Posting:
    """`amount` (> 0) moves from account `source` to account `target`, once per key."""

    key: str
    kind: str
    source: int
    target: int
    amount: Decimal
    job_id: str | None = None
    attempt: int | None = None
    provider_id: str | None = None
    gpu_model: str | None = None
    memo: str | None = None


@dataclass(frozen=True)
class Locked:
    """Accounts locked for this transaction: their ids and balances as of the lock."""

    ids: dict[AccountKey, int]
    balances: dict[int, Decimal]

    def balance(self, key: AccountKey) -> Decimal:
        return self.balances[self.ids[key]]


def _accounts(wanted: list[AccountKey]) -> Select:
    # Arrays, not an IN list of pairs: one statement text for any number of accounts.
    asked = array_rows(
        "asked",
        kind=(String, [k for k, _ in wanted]),
        owner_id=(String, [o for _, o in wanted]),
    )
    return (
        select(Account.id, Account.kind, Account.owner_id, Account.balance)
        .join(asked, (Account.kind == asked.c.kind) & (Account.owner_id == asked.c.owner_id))
        .order_by(Account.id)
    )


async def account_ids(session: AsyncSession, keys: Iterable[AccountKey]) -> dict[AccountKey, int]:
    """The ids of those of these accounts that exist, without locking them."""
    wanted = sorted(set(keys))
    rows = (await session.execute(_accounts(wanted))).all() if wanted else []
    return {(r.kind, r.owner_id): r.id for r in rows}


async def lock(session: AsyncSession, keys: Iterable[AccountKey]) -> Locked:
    """Locks these accounts, opening the ones that don't exist yet, always in id order so
    that concurrent writers never deadlock. One query when they all exist (the usual case)."""
    wanted = sorted(set(keys))
    query = _accounts(wanted).with_for_update(of=Account)
    rows = (await session.execute(query)).all() if wanted else []
    if len(rows) < len(wanted):
        found = {(r.kind, r.owner_id) for r in rows}
        await session.execute(
            insert(Account)
            .values([{"kind": k, "owner_id": o} for k, o in wanted if (k, o) not in found])
            .on_conflict_do_nothing()
        )
        # New accounts have higher ids than the ones already locked: still in id order.
        rows = (await session.execute(query)).all()
    return Locked(
        ids={(r.kind, r.owner_id): r.id for r in rows}, balances={r.id: r.balance for r in rows}
    )


async def post(session: AsyncSession, postings: list[Posting]) -> list[Posting]:
    """Posts each transfer whose key is new, as a pair of entries summing to zero; returns
    the ones posted (a replay posts nothing)."""
    postings = [p for p in postings if p.amount != 0]
    if not postings:
        return []
    for p in postings:
        if p.amount < 0 or p.source == p.target:
            raise ValueError(f"transfer {p.key}: amount must be positive between two accounts")
    # Arrays, not a VALUES list: one statement text whatever the number of postings.
    # (An executemany with ON CONFLICT and RETURNING would go row by row.)
    columns = ("key", "kind", "amount", "job_id", "attempt", "provider_id", "gpu_model", "memo")
    rows = await session.execute(
        insert_rows(Transfer.__table__, [{c: getattr(p, c) for c in columns} for p in postings])
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(Transfer.id, Transfer.key)
    )
    new = {r.key: r.id for r in rows}
    posted = [p for p in postings if p.key in new]
    if posted:
        # One statement, not an executemany: the balance trigger runs per statement, and
        # an executemany would update the same few accounts once per entry.
        await session.execute(
            insert_rows(
                Entry.__table__,
                [
                    {"transfer_id": new[p.key], "account_id": account, "amount": amount}
                    for p in posted
                    for account, amount in ((p.source, -p.amount), (p.target, p.amount))
                ],
            )
        )
    return posted
