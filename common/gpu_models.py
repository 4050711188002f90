"""One spelling per GPU model, so prices, offers and job constraints agree.

NVML names a card "NVIDIA GeForce RTX 4090" or "Tesla T4"; people write "RTX 4090" and
"T4". The vendor and brand prefixes carry no information for matching, so they go.
"""

import re

_PREFIXES = re.compile(r"^(?:nvidia\s+)?(?:geforce\s+|tesla\s+|quadro\s+)?", re.IGNORECASE)


def canonical_model(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'RTX 4090'; 'nvidia  h100  80gb hbm3' -> 'H100 80GB HBM3'."""
    words = " ".join(name.split())
    return _PREFIXES.sub("", words).upper() or words.upper()
