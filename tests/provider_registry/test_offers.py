"""The market's search on a real PostgreSQL: every filter returns exactly the GPUs that
match it, no more and no fewer."""

from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from provider_registry import offers
from provider_registry.models import DRAINING, OFFLINE, Gpu
from provider_registry.offers import OfferQuery
from tests.provider_registry.factories import create_provider, reserve_any


@pytest.fixture
async def fleet(db: async_sessionmaker) -> dict[str, str]:
    """Machines that differ in one thing each; returns name -> provider id."""
    specs = {
        "h100x8": dict(
            gpus=8,
            model="H100",
            vram_mb=81920,
            price="2.50",
            compute_capability="9.0",
            cuda_version="12.4",
            region="eu-west",
            labels={"nvlink": "yes"},
            reliability=0.99,
            pcie=(5, 16),
        ),
        "a100x4": dict(
            gpus=4,
            model="A100",
            vram_mb=81920,
            price="1.20",
            compute_capability="8.0",
            cuda_version="12.2",
            region="us-east",
            reliability=0.95,
        ),
        "4090x2": dict(
            gpus=2,
            model="RTX 4090",
            vram_mb=24576,
            price="0.40",
            compute_capability="8.9",
            cuda_version="12.4",
            region="eu-west",
            reliability=0.80,
        ),
        "t4x1": dict(
            gpus=1,
            model="T4",
            vram_mb=16384,
            price="0.10",
            compute_capability="7.5",
            cuda_version="11.8",
            region="us-east",
            reliability=0.99,
            pcie=(3, 8),
        ),
        "cc10": dict(
            gpus=1,
            model="B200",
            vram_mb=184320,
            price="6.00",
            compute_capability="10.0",
            cuda_version="12.10",
            region="us-east",
            reliability=0.97,
        ),
        "sim": dict(gpus=2, model="RTX 4090", price="0.05", simulated=True),
        "offline": dict(gpus=2, model="RTX 4090", price="0.01", state=OFFLINE),
        "draining": dict(gpus=2, model="RTX 4090", price="0.02", state=DRAINING),
    }
    ids = {}
    async with db.begin() as session:
        for name, spec in specs.items():
            ids[name] = (await create_provider(session, **spec)).id  # type: ignore[arg-type]
    return ids


async def search(db: async_sessionmaker, **kw) -> list[tuple[str, str, int]]:  # type: ignore[no-untyped-def]
    async with db() as session:
        page = await offers.search_offers(session, OfferQuery(**kw))
    return [(o.provider_id, o.model, o.free_gpus) for o in page.offers]


def names(ids: dict[str, str], found: list[tuple[str, str, int]]) -> list[str]:
    by_id = {v: k for k, v in ids.items()}
    return [by_id[pid] for pid, _, _ in found]


class TestFilters:
    async def test_live_real_machines_only_cheapest_first(self, db, fleet) -> None:  # type: ignore[no-untyped-def]
        assert names(fleet, await search(db)) == ["t4x1", "4090x2", "a100x4", "h100x8", "cc10"]
        with_sim = names(fleet, await search(db, include_simulated=True))
        assert with_sim[0] == "sim" and "offline" not in with_sim and "draining" not in with_sim

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ({"models": ["h100", "A100"]}, {"h100x8", "a100x4"}),
            ({"min_vram_gb": 80}, {"h100x8", "a100x4", "cc10"}),
            ({"min_vram_gb": 80.1}, {"cc10"}),
            # Numeric, not text: "10.0" is above "9.0" and "8.9".
            ({"min_compute_capability": "8.9"}, {"h100x8", "4090x2", "cc10"}),
            ({"min_compute_capability": "10.0"}, {"cc10"}),
            ({"min_cuda_version": "12.4"}, {"h100x8", "4090x2", "cc10"}),
            ({"min_cuda_version": "12.10"}, {"cc10"}),
            ({"max_price": Decimal("1.20")}, {"a100x4", "4090x2", "t4x1"}),
            ({"max_price": Decimal("0.39")}, {"t4x1"}),
            ({"regions": ["eu-west"]}, {"h100x8", "4090x2"}),
            ({"min_reliability": 0.97}, {"h100x8", "t4x1", "cc10"}),
            ({"min_gpus": 4}, {"h100x8", "a100x4"}),
            ({"min_gpus": 5}, {"h100x8"}),
            ({"labels": {"nvlink": "yes"}}, {"h100x8"}),
            ({"labels": {"nvlink": "no"}}, set()),
            ({"regions": ["us-east"], "min_vram_gb": 40, "max_price": Decimal("2")}, {"a100x4"}),
        ],
    )
    async def test_each_filter_returns_exactly_the_matches(  # type: ignore[no-untyped-def]
        self, db, fleet, query, expected
    ) -> None:
        assert set(names(fleet, await search(db, **query))) == expected

    async def test_busy_and_unhealthy_gpus_are_not_free(self, db, fleet) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            held = await reserve_any(session, "job-1", 3, "H100")
            assert held is not None
            await session.execute(
                update(Gpu)
                .where(Gpu.uuid == f"GPU-{fleet['h100x8'][:8]}-7")
                .values(healthy=False, health_reason="XID 79")
            )
        found = await search(db, models=["H100"])
        assert found == [(fleet["h100x8"], "H100", 4)]
        assert await search(db, models=["H100"], min_gpus=5) == []
        async with db() as session:
            page = await offers.search_offers(session, OfferQuery(models=["H100"]))
        assert page.offers[0].total_gpus == 8 and page.offers[0].pcie_gen == 5
        # Nor does the scheduler get the unhealthy one.
        async with db.begin() as session:
            assert await reserve_any(session, "j2", 5, "H100") is None

    async def test_one_offer_per_machine_and_model(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session, gpus=2, model="A10")
            session.add(
                Gpu(
                    provider_id=machine.id,
                    uuid="GPU-extra",
                    index=2,
                    model="L4",
                    vram_mb=24576,
                    price_per_hour=Decimal("0.3"),
                )
            )
        assert sorted(await search(db)) == sorted([(machine.id, "A10", 2), (machine.id, "L4", 1)])


class TestSortingAndPaging:
    async def test_sort_orders(self, db, fleet) -> None:  # type: ignore[no-untyped-def]
        assert names(fleet, await search(db, sort="-price")) == [
            "cc10",
            "h100x8",
            "a100x4",
            "4090x2",
            "t4x1",
        ]
        by_reliability = names(fleet, await search(db, sort="-reliability"))
        assert by_reliability[-1] == "4090x2" and by_reliability[0] == "t4x1"
        assert names(fleet, await search(db, sort="-vram"))[0] == "cc10"
        assert names(fleet, await search(db, sort="-free_gpus"))[0] == "h100x8"

    async def test_pages_cover_every_offer_once(self, db, fleet) -> None:  # type: ignore[no-untyped-def]
        seen = []
        for offset in range(0, 6, 2):
            async with db() as session:
                page = await offers.search_offers(session, OfferQuery(limit=2, offset=offset))
            assert page.total == 5
            seen += [o.provider_id for o in page.offers]
        assert len(seen) == len(set(seen)) == 5
        async with db() as session:
            past = await offers.search_offers(session, OfferQuery(limit=2, offset=10))
        assert past.offers == [] and past.total == 5
