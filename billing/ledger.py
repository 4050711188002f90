"""Posting to the double-entry ledger. Functions take the session; the caller owns the
transaction, and locks the accounts it moves money between (`lock`) before deciding."""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Integer, Numeric, String, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import Account, Entry, Transfer

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


async def lock(session: AsyncSession, keys: Iterable[AccountKey]) -> Locked:
    """Locks these accounts, opening the ones that don't exist yet, always in id order so
    that concurrent writers never deadlock. One query when they all exist (the usual case)."""
    wanted = sorted(set(keys))
    # Two arrays, not an IN list of pairs: the same statement text for any number of
    # accounts, so asyncpg prepares it once.
    asked = (
        func.unnest(
            bindparam("kinds", [k for k, _ in wanted], ARRAY(String)),
            bindparam("owners", [o for _, o in wanted], ARRAY(String)),
        )
        .table_valued("kind", "owner_id")
        .render_derived(name="asked")
    )
    query = (
        select(Account.id, Account.kind, Account.owner_id, Account.balance)
        .join(asked, (Account.kind == asked.c.kind) & (Account.owner_id == asked.c.owner_id))
        .order_by(Account.id)
        .with_for_update(of=Account)
    )
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
    # Arrays unnested, not a VALUES list: one statement text (one prepared statement)
    # whatever the number of postings. (An executemany with ON CONFLICT and RETURNING
    # would go row by row.)
    columns = {
        "key": String,
        "kind": String,
        "amount": Numeric(20, 6),
        "job_id": String,
        "attempt": Integer,
        "provider_id": String,
        "gpu_model": String,
        "memo": String,
    }
    given = (
        func.unnest(
            *(
                bindparam(name, [getattr(p, name) for p in postings], ARRAY(kind))
                for name, kind in columns.items()
            )
        )
        .table_valued(*columns)
        .render_derived(name="given")
    )
    rows = await session.execute(
        insert(Transfer)
        .from_select(list(columns), select(given))
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(Transfer.id, Transfer.key)
    )
    new = {r.key: r.id for r in rows}
    posted = [p for p in postings if p.key in new]
    if posted:
        await session.execute(
            insert(Entry),
            [
                leg
                for p in posted
                for leg in (
                    {"transfer_id": new[p.key], "account_id": p.source, "amount": -p.amount},
                    {"transfer_id": new[p.key], "account_id": p.target, "amount": p.amount},
                )
            ],
        )
    return posted
