"""Holds: a job's worst-case cost set aside when it is submitted."""

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from billing import amounts, ledger
from billing.models import AVAILABLE, HELD
from common.errors import DomainError


class InsufficientFunds(DomainError):
    status_code = 402

    def __init__(self, required: Decimal, available: Decimal) -> None:
        self.required, self.available = required, available
        self.missing = required - available
        super().__init__(
            f"insufficient credits: this submission needs a hold of {amounts.show(required)} "
            f"credits (GPUs x price ceiling x max_duration_s) and the available balance is "
            f"{amounts.show(available)}; {amounts.show(self.missing)} more credits are needed",
        )

    def body(self) -> dict:
        return {
            **super().body(),
            "required": amounts.show(self.required),
            "available": amounts.show(self.available),
            "missing": amounts.show(self.missing),
        }


@dataclass(frozen=True)
class Hold:
    job_id: str
    amount: Decimal


def hold_amount(
    gpus: int, max_price_per_gpu_hour: Decimal, max_duration_s: int, billable_attempts: int
) -> Decimal:
    """GPUs x price ceiling x time limit, for every attempt that could be charged."""
    return amounts.credits(
        gpus * max_price_per_gpu_hour * max_duration_s * billable_attempts / Decimal(3600)
    )


async def place_holds(session: AsyncSession, owner_id: str, holds: list[Hold]) -> None:
    """Moves each job's hold from the owner's available credits to held, or refuses the
    whole submission with a 402 saying how much is missing (nothing is written)."""
    admission = await admit_holds(session, [(owner_id, holds)])
    if admission.refusals[0] is not None:
        raise admission.refusals[0]
    await ledger.post(session, admission.postings)


@dataclass(frozen=True)
class Admission:
    """Which of many submissions their owners' credits cover: `refusals[i]` is None for an
    admitted one; `postings` move the admitted holds once the jobs are written."""

    refusals: list[InsufficientFunds | None]
    postings: list[ledger.Posting]


async def admit_holds(session: AsyncSession, wanted: list[tuple[str, list[Hold]]]) -> Admission:
    """Decides many submissions, each (owner_id, the holds of its jobs), at once and in
    their order, exactly as if each had been placed alone one after the other: one lock
    query for every owner, and a submission its owner's remaining credits don't cover
    is refused whole (a job array is all or nothing) and on its own."""
    owners = {owner_id for owner_id, _ in wanted}
    locked = await ledger.lock(
        session, [key for o in owners for key in ((AVAILABLE, o), (HELD, o))]
    )
    left = {o: locked.balance((AVAILABLE, o)) for o in owners}
    refusals: list[InsufficientFunds | None] = []
    postings = []
    for owner_id, holds in wanted:
        required = sum((h.amount for h in holds), Decimal(0))
        if required > left[owner_id]:
            refusals.append(InsufficientFunds(required, left[owner_id]))
            continue
        left[owner_id] -= required
        refusals.append(None)
        postings += [_hold_posting(locked, owner_id, hold) for hold in holds]
    return Admission(refusals, postings)


def _hold_posting(locked: ledger.Locked, owner_id: str, hold: Hold) -> ledger.Posting:
    return ledger.Posting(
        key=f"hold:{hold.job_id}",
        kind="hold",
        source=locked.ids[(AVAILABLE, owner_id)],
        target=locked.ids[(HELD, owner_id)],
        amount=hold.amount,
        job_id=hold.job_id,
    )
