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


_TOKEN_SPLIT = re.compile(r"[^A-Z0-9]+")


def model_tokens(name: str) -> tuple[str, ...]:
    """'A100-SXM4-80GB' -> ('A100', 'SXM4', '80GB'): the canonical name's words."""
    return tuple(t for t in _TOKEN_SPLIT.split(canonical_model(name)) if t)


def model_matches(requested: str, model: str) -> bool:
    """Whether a GPU of `model` is one of `requested`: every requested word is in its name.

    "H100" matches "H100 80GB HBM3" and "H100 PCIE"; "A100 80GB" matches "A100-SXM4-80GB";
    "RTX 4090" matches "RTX 4090 D" but not "RTX 3090". A request with no words (only
    punctuation) matches nothing.
    """
    wanted = model_tokens(requested)
    return bool(wanted) and set(wanted).issubset(model_tokens(model))
