"""Credit amounts: exact to a millionth. Pure arithmetic, so the REST schemas (and the
requester's client, which reuses them) need no database code."""

from decimal import ROUND_HALF_UP, Decimal

CREDIT_STEP = Decimal("0.000001")


def credits(amount: Decimal) -> Decimal:
    """Rounded to the ledger's precision, half up."""
    return amount.quantize(CREDIT_STEP, rounding=ROUND_HALF_UP)


def show(amount: Decimal) -> str:
    """For people: at least cents, more only where they count ("12.00", "0.004167")."""
    text = f"{credits(amount):f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"
