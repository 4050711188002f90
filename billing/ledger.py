"""Posting to the double-entry ledger. Functions take the session; the caller owns the
transaction, and locks the accounts it moves money between (`lock`) before deciding."""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import String, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import Account, Entry, Transfer
from common.db import ArrayRows, insert_rows

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


# Arrays, not an IN list of pairs: one statement text for any number of accounts.
_ASKED = ArrayRows("asked", kind=String, owner_id=String)
_ACCOUNTS = (
    select(Account.id, Account.kind, Account.owner_id, Account.balance)
    .join(
        _ASKED.table,
        (Account.kind == _ASKED.table.c.kind) & (Account.owner_id == _ASKED.table.c.owner_id),
    )
    .order_by(Account.id)
)
_LOCK_ACCOUNTS = _ACCOUNTS.with_for_update(of=Account)


def _asked(wanted: list[AccountKey]) -> dict[str, list[str]]:
    return _ASKED.params([{"kind": k, "owner_id": o} for k, o in wanted])


async def account_ids(session: AsyncSession, keys: Iterable[AccountKey]) -> dict[AccountKey, int]:
    """The ids of those of these accounts that exist, without locking them."""
    wanted = sorted(set(keys))
    rows = (await session.execute(_ACCOUNTS, _asked(wanted))).all() if wanted else []
    return {(r.kind, r.owner_id): r.id for r in rows}


async def lock(session: AsyncSession, keys: Iterable[AccountKey]) -> Locked:
    """Locks these accounts, opening the ones that don't exist yet, always in id order so
    that concurrent writers never deadlock. One query when they all exist (the usual case)."""
    wanted = sorted(set(keys))
    rows = (await session.execute(_LOCK_ACCOUNTS, _asked(wanted))).all() if wanted else []
    if len(rows) < len(wanted):
        found = {(r.kind, r.owner_id) for r in rows}
        await session.execute(
            insert(Account)
            .values([{"kind": k, "owner_id": o} for k, o in wanted if (k, o) not in found])
            .on_conflict_do_nothing()
        )
        # New accounts have higher ids than the ones already locked: still in id order.
        rows = (await session.execute(_LOCK_ACCOUNTS, _asked(wanted))).all()
    return Locked(
        ids={(r.kind, r.owner_id): r.id for r in rows}, balances={r.id: r.balance for r in rows}
    )


# Arrays, not a VALUES list: one statement text whatever the number of postings. (An
# executemany with ON CONFLICT and RETURNING would go row by row; and the balance
# trigger runs per statement, so an executemany of entries would update the same few
# accounts once per entry.)
_TRANSFERS = ArrayRows.of(
    Transfer.__table__,
    ("key", "kind", "amount", "job_id", "attempt", "provider_id", "gpu_model", "memo"),
)
_INSERT_TRANSFERS = (
    insert_rows(Transfer.__table__, _TRANSFERS)
    .on_conflict_do_nothing(index_elements=["key"])
    .returning(Transfer.id, Transfer.key)
)
_ENTRIES = ArrayRows.of(Entry.__table__, ("transfer_id", "account_id", "amount"))
_INSERT_ENTRIES = insert_rows(Entry.__table__, _ENTRIES)


async def post(session: AsyncSession, postings: list[Posting]) -> list[Posting]:
    """Posts each transfer whose key is new, as a pair of entries summing to zero; returns
    the ones posted (a replay posts nothing)."""
    postings = [p for p in postings if p.amount != 0]
    if not postings:
        return []
    for p in postings:
        if p.amount < 0 or p.source == p.target:
            raise ValueError(f"transfer {p.key}: amount must be positive between two accounts")
    rows = await session.execute(_INSERT_TRANSFERS, _TRANSFERS.params_of(postings))
    new = {r.key: r.id for r in rows}
    posted = [p for p in postings if p.key in new]
    if posted:
        await session.execute(
            _INSERT_ENTRIES,
            _ENTRIES.params(
                [
                    {"transfer_id": new[p.key], "account_id": account, "amount": amount}
                    for p in posted
                    for account, amount in ((p.source, -p.amount), (p.target, p.amount))
                ]
            ),
        )
    return posted
