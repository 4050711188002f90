"""Model families: a requested model matches every GPU whose name holds all its words,
in Python (common.gpu_models.model_matches) and in the market's SQL alike."""

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.gpu_models import canonical_model, model_matches, model_tokens
from provider_registry import offers
from provider_registry.offers import OfferQuery
from tests.provider_registry.factories import create_provider

FLEET = [
    "H100 80GB HBM3",
    "H100 PCIE",
    "H100",
    "A100-SXM4-80GB",
    "A100-PCIE-40GB",
    "RTX 4090",
    "RTX 4090 D",
    "RTX 3090",
    "L4",
    "L40S",
    "T4",
]

CASES = [
    ("H100", {"H100 80GB HBM3", "H100 PCIE", "H100"}),
    ("h100", {"H100 80GB HBM3", "H100 PCIE", "H100"}),
    ("NVIDIA H100 80GB HBM3", {"H100 80GB HBM3"}),
    ("H100 PCIe", {"H100 PCIE"}),
    ("A100", {"A100-SXM4-80GB", "A100-PCIE-40GB"}),
    ("A100 80GB", {"A100-SXM4-80GB"}),
    ("A100-80GB", {"A100-SXM4-80GB"}),
    ("RTX 4090", {"RTX 4090", "RTX 4090 D"}),
    ("NVIDIA GeForce RTX 4090", {"RTX 4090", "RTX 4090 D"}),
    ("RTX 4090 D", {"RTX 4090 D"}),
    ("4090", {"RTX 4090", "RTX 4090 D"}),
    ("RTX", {"RTX 4090", "RTX 4090 D", "RTX 3090"}),
    ("L4", {"L4"}),
    ("T4", {"T4"}),
    # Whole words only, and every word.
    ("H10", set()),
    ("100", set()),
    ("RTX 5090", set()),
    ("80GB", {"H100 80GB HBM3", "A100-SXM4-80GB"}),
    # Punctuation separates words; it is never a pattern.
    ("H100 (80GB)", {"H100 80GB HBM3"}),
    ("A100+", {"A100-SXM4-80GB", "A100-PCIE-40GB"}),
    ("L4.*", {"L4"}),
    ("-", set()),
    ("", set()),
]


class TestModelMatches:
    @pytest.mark.parametrize(("requested", "expected"), CASES)
    def test_cases(self, requested: str, expected: set[str]) -> None:
        assert {m for m in FLEET if model_matches(requested, m)} == expected

    def test_both_sides_are_canonicalised(self) -> None:
        assert model_matches("rtx 4090", "NVIDIA GeForce RTX 4090")
        assert model_tokens("NVIDIA  Tesla T4") == ("T4",)
        assert canonical_model("nvidia geforce rtx 4090") == "RTX 4090"


@pytest.fixture
async def fleet(db: async_sessionmaker) -> None:
    async with db.begin() as session:
        for model in FLEET:
            await create_provider(session, gpus=1, model=model)


async def offered(db: async_sessionmaker, *models: str) -> set[str]:
    async with db() as session:
        page = await offers.search_offers(session, OfferQuery(models=list(models), limit=100))
    return {o.model for o in page.offers}


class TestOfferModels:
    @pytest.mark.parametrize(("requested", "expected"), CASES)
    async def test_sql_agrees_with_model_matches(
        self, db: async_sessionmaker, fleet: None, requested: str, expected: set[str]
    ) -> None:
        assert await offered(db, requested) == expected

    async def test_alternatives_are_or_ed(self, db: async_sessionmaker, fleet: None) -> None:
        assert await offered(db, "A100 80GB", "T4", "B200") == {"A100-SXM4-80GB", "T4"}
        assert await offered(db, "-", "L40S") == {"L40S"}
        assert await offered(db) == set(FLEET)
