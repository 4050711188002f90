"""Where credits come from. Today an admin grants them; a payment provider's webhook
would call `add_credits` the same way, with its payment id as the reference, so a
webhook delivered twice credits once."""

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from billing import amounts, ledger
from billing.models import AVAILABLE, FUNDING, PLATFORM


@dataclass(frozen=True)
class Credited:
    reference: str
    # False when this reference had been credited before: nothing changed this time.
    credited: bool
    balance: Decimal


async def add_credits(
    session: AsyncSession,
    owner_id: str,
    amount: Decimal,
    *,
    source: str = "admin",
    reference: str | None = None,
    memo: str | None = None,
) -> Credited:
    """Credits the owner's available balance from `source`, once per (source, reference)."""
    reference = reference or str(uuid.uuid4())
    locked = await ledger.lock(session, [(FUNDING, PLATFORM), (AVAILABLE, owner_id)])
    ids = locked.ids
    available = ids[(AVAILABLE, owner_id)]
    posted = await ledger.post(
        session,
        [
            ledger.Posting(
                key=f"credit:{source}:{reference}",
                kind="credit",
                source=ids[(FUNDING, PLATFORM)],
                target=available,
                amount=amounts.credits(amount),
                memo=memo or f"{source} {reference}",
            )
        ],
    )
    balance = locked.balances[available] + (posted[0].amount if posted else 0)
    return Credited(reference=reference, credited=bool(posted), balance=balance)
