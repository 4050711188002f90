"""Input types shared by the services' HTTP schemas."""

import re
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, Field


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it at the edge with a 422, not a 500 later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SafeStr = Annotated[str, AfterValidator(_no_nul)]

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(value: str) -> str:
    if not _HEX_SHA256.fullmatch(value):
        raise ValueError("must be the SHA-256 of the bytes as 64 lowercase hex characters")
    return value


# A sha256 as hex, the way sha256sum prints it.
Sha256 = Annotated[str, AfterValidator(_sha256)]

# Fits the numeric(12, 6) price columns.
Price = Annotated[
    Decimal, Field(ge=0, le=100_000, max_digits=12, decimal_places=6, allow_inf_nan=False)
]

# "8.9", "12.4": compared as numbers part by part, so "10.0" is above "9.0".
VERSION_PATTERN = r"^\d{1,3}\.\d{1,3}$"
# Label keys, Kubernetes-like: lowercase, digits, '.', '_', '-', '/'.
LABEL_KEY_PATTERN = r"^[a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?$"
# Labels under this prefix are the platform's: the daemon sets them from its policy.
RESERVED_LABEL_PREFIX = "gpumarket/"
# A machine whose owner lets jobs reach the network carries this label; a job that asks
# for egress requires it, so placement uses the labels' own matching.
EGRESS_LABEL = ("gpumarket/network", "egress")


def version_number(version: str | None) -> int | None:
    """'8.9' -> 8009, '12.10' -> 12010: one integer that orders versions correctly."""
    if not version:
        return None
    major, _, minor = version.partition(".")
    try:
        return int(major) * 1000 + int(minor or 0)
    except ValueError:
        return None
