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
    locked = await ledger.lock(session, [(AVAILABLE, owner_id), (HELD, owner_id)])
    available, held = locked.ids[(AVAILABLE, owner_id)], locked.ids[(HELD, owner_id)]
    required = sum((h.amount for h in holds), Decimal(0))
    if required > locked.balances[available]:
        raise InsufficientFunds(required, locked.balances[available])
    await ledger.post(
        session,
        [
            ledger.Posting(
                key=f"hold:{h.job_id}",
                kind="hold",
                source=available,
                target=held,
                amount=h.amount,
                job_id=h.job_id,
            )
            for h in holds
        ],
    )
