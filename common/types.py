"""Input types shared by the services' HTTP schemas."""

from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, Field


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it at the edge with a 422, not a 500 later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SafeStr = Annotated[str, AfterValidator(_no_nul)]

# Fits the numeric(12, 6) price columns.
Price = Annotated[
    Decimal, Field(ge=0, le=100_000, max_digits=12, decimal_places=6, allow_inf_nan=False)
]
