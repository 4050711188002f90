"""The in-memory fleet index: every Demand field, the score, take/release, updates, the
reasons for unplaceable jobs, and agreement with a naive reference on random fleets."""

import math
import random
from dataclasses import replace

import pytest

from common.gpu_models import model_matches
from scheduler.fleet_index import (
    INFRASTRUCTURE_FAULTS,
    Choice,
    Demand,
    FleetIndex,
    FleetSnapshot,
    GpuView,
    MachineView,
    Weights,
    decision_timings,
    synthetic_fleet,
)


def gpus(
    count: int,
    model: str = "RTX 4090",
    prefix: str = "g",
    vram_mb: int = 24576,
    cc: int | None = 8009,
    price: float = 0.5,
    reserved: int = 0,
    unhealthy: int = 0,
    start: int = 0,
) -> tuple[GpuView, ...]:
    """`count` GPUs; the first `reserved` are held, the last `unhealthy` are broken."""
    return tuple(
        GpuView(
            uuid=f"{prefix}-{model}-{start + i}",
            index=start + i,
            model=model,
            vram_mb=vram_mb,
            compute_capability=cc,
            price_per_hour=price,
            healthy=i < count - unhealthy,
            reserved=i < reserved,
        )
        for i in range(count)
    )


def machine(provider_id: str, *gpu_groups: tuple[GpuView, ...], **fields) -> MachineView:  # type: ignore[no-untyped-def]
    defaults = dict(
        schedulable=True,
        simulated=False,
        region="eu-west",
        labels={},
        reliability=1.0,
        cuda_version=12004,
        cpu_count=32,
        memory_mb=131072,
    )
    defaults.update(fields)
    all_gpus = tuple(g for group in gpu_groups for g in group) or gpus(2, prefix=provider_id)
    return MachineView(provider_id=provider_id, gpus=all_gpus, **defaults)  # type: ignore[arg-type]


def index_of(
    *machines: MachineView, weights: Weights = Weights(), tie_seed: int | None = None
) -> FleetIndex:
    index = FleetIndex(weights, tie_seed)
    for m in machines:
        index.upsert(m)
    return index


def chosen(index: FleetIndex, **demand) -> str | None:  # type: ignore[no-untyped-def]
    choice = index.choose(Demand(**demand))
    return choice.provider_id if choice else None


class TestScore:
    def test_cheapest_then_most_reliable_then_fullest(self) -> None:
        cheap = machine("cheap", gpus(2, prefix="c", price=0.4), reliability=0.9)
        dear = machine("dear", gpus(2, prefix="d", price=0.5))
        assert chosen(index_of(cheap, dear), count=1) == "cheap"
        # At one price, the more reliable machine.
        shaky = machine("shaky", gpus(2, prefix="s"), reliability=0.9)
        solid = machine("solid", gpus(2, prefix="o"), reliability=0.99)
        assert chosen(index_of(shaky, solid), count=1) == "solid"
        # At one price and reliability, the machine that is already partly used.
        empty = machine("empty", gpus(4, prefix="e"))
        used = machine("used", gpus(4, prefix="u", reserved=2))
        assert chosen(index_of(empty, used), count=1) == "used"
        assert chosen(index_of(used, empty), count=1) == "used"

    def test_score_formula_and_choice_fields(self) -> None:
        index = index_of(machine("m", gpus(4, price=1.5, reserved=1), reliability=0.8))
        choice = index.choose(Demand(count=2))
        # 1.5 + 0.01 x 0.2 + 0.0001 x (3 free - 2) / 4
        assert choice == Choice("m", "RTX 4090", 1.5, pytest.approx(1.5 + 0.002 + 0.000025))

    def test_weights(self) -> None:
        cheap_shaky = machine("a", gpus(1, prefix="a", price=0.4), reliability=0.5)
        dear_solid = machine("b", gpus(1, prefix="b", price=0.5), reliability=1.0)
        # By default a cent per GPU-hour outweighs any reliability gap.
        assert chosen(index_of(cheap_shaky, dear_solid), count=1) == "a"
        index = index_of(cheap_shaky, dear_solid, weights=Weights(reliability=1.0))
        assert chosen(index, count=1) == "b"
        index.weights = Weights(reliability=0.1)
        assert chosen(index, count=1) == "a"

    def test_ties_go_to_the_machine_known_first(self) -> None:
        machines = [machine(f"m{i}", gpus(2, prefix=f"m{i}")) for i in (3, 1, 2)]
        index = index_of(*machines)
        assert chosen(index, count=1) == "m3"
        # Reloading a machine keeps its place.
        index.upsert(machines[0])
        assert chosen(index, count=1) == "m3"

    def test_a_tie_seed_gives_each_index_its_own_order(self) -> None:
        machines = [machine(f"m{i}", gpus(1, prefix=f"m{i}")) for i in range(50)]
        firsts = set()
        for seed in range(8):
            index = index_of(*machines, tie_seed=seed)
            first = chosen(index, count=1)
            # The same seed ranks the same way, whatever order the machines came in,
            # and a reload keeps the machine's place.
            assert chosen(index_of(*reversed(machines), tie_seed=seed), count=1) == first
            index.load(FleetSnapshot.from_machines(machines))
            assert chosen(index, count=1) == first
            firsts.add(first)
        assert len(firsts) > 4
        # Ties only: a cheaper machine wins under every seed.
        cheap = machine("cheap", gpus(1, prefix="cheap", price=0.4))
        assert {chosen(index_of(*machines, cheap, tie_seed=s), count=1) for s in range(8)} == {
            "cheap"
        }


class TestPools:
    def test_a_job_takes_gpus_of_one_model_from_one_machine(self) -> None:
        mixed = machine("mixed", gpus(2, "RTX 4090"), gpus(2, "A100", price=1.0, start=2))
        index = index_of(mixed)
        assert chosen(index, count=2) == "mixed"
        assert chosen(index, count=3) is None
        assert index.choose(Demand(count=2, models=("A100",))).model == "A100"

    def test_free_means_healthy_and_not_reserved(self) -> None:
        index = index_of(machine("m", gpus(4, reserved=1, unhealthy=1)))
        assert chosen(index, count=2) == "m"
        assert chosen(index, count=3) is None

    def test_pool_price_vram_and_capability_are_its_healthy_gpus_worst(self) -> None:
        index = index_of(
            machine(
                "m",
                gpus(1, prefix="a", price=0.5, vram_mb=81920, cc=9000),
                gpus(1, prefix="b", price=0.9, vram_mb=40960, cc=8000, start=1),
            )
        )
        choice = index.choose(Demand(count=2))
        assert choice.price_per_hour == 0.9
        assert chosen(index, count=2, min_vram_mb=81920) is None
        assert chosen(index, count=1, min_vram_mb=81920) is None  # one pool of both
        assert chosen(index, count=2, min_compute_capability=8000) == "m"
        assert chosen(index, count=2, min_compute_capability=9000) is None
        # A broken GPU does not drag the pool down.
        index.upsert(
            machine(
                "m",
                gpus(1, prefix="a", price=0.5, vram_mb=81920, cc=9000),
                gpus(1, prefix="b", price=0.9, vram_mb=40960, cc=None, start=1, unhealthy=1),
            )
        )
        assert index.choose(Demand(count=1, min_vram_mb=81920)).price_per_hour == 0.5


class TestDemandFields:
    @pytest.fixture
    def index(self) -> FleetIndex:
        return index_of(
            machine(
                "h100",
                gpus(8, "H100 80GB HBM3", "h", vram_mb=81920, cc=9000, price=2.5),
                region="us-east",
                labels={"nvlink": "yes", "tier": "gold"},
                cuda_version=12008,
                cpu_count=64,
                memory_mb=1048576,
            ),
            machine(
                "a100",
                gpus(4, "A100-SXM4-80GB", "a", vram_mb=81920, cc=8000, price=1.2),
                labels={"tier": "silver"},
                cuda_version=12002,
                cpu_count=16,
                memory_mb=65536,
            ),
            machine("4090d", gpus(2, "RTX 4090 D", "d", price=0.3), cpu_count=None),
            machine("3090", gpus(2, "RTX 3090", "t", cc=8006, price=0.2), memory_mb=None),
            machine("sim", gpus(8, prefix="s", price=0.01), simulated=True),
            machine("off", gpus(8, prefix="o", price=0.01), schedulable=False),
        )

    @pytest.mark.parametrize(
        ("demand", "expected"),
        [
            ({"count": 1}, "3090"),
            ({"count": 1, "models": ("H100",)}, "h100"),
            ({"count": 1, "models": ("A100 80GB",)}, "a100"),
            ({"count": 1, "models": ("RTX 4090",)}, "4090d"),
            ({"count": 1, "models": ("nvidia geforce rtx 4090",)}, "4090d"),
            ({"count": 1, "models": ("A100", "H100")}, "a100"),
            ({"count": 1, "models": ("B200",)}, None),
            ({"count": 1, "min_vram_mb": 40000}, "a100"),
            ({"count": 1, "min_compute_capability": 8009}, "4090d"),
            ({"count": 1, "min_compute_capability": 9000}, "h100"),
            ({"count": 1, "min_cuda_version": 12008}, "h100"),
            ({"count": 1, "max_price_per_hour": 0.1}, None),
            ({"count": 1, "max_price_per_hour": 0.2}, "3090"),
            ({"count": 1, "region": "us-east"}, "h100"),
            ({"count": 1, "region": "mars"}, None),
            ({"count": 1, "labels": (("tier", "gold"),)}, "h100"),
            ({"count": 1, "labels": (("tier", "silver"),)}, "a100"),
            ({"count": 1, "labels": (("tier", "gold"), ("nvlink", "yes"))}, "h100"),
            ({"count": 1, "labels": (("tier", "silver"), ("nvlink", "yes"))}, None),
            ({"count": 1, "labels": (("tier", "bronze"),)}, None),
            ({"count": 1, "labels": (("rack", "1"),)}, None),
            ({"count": 5}, "h100"),
            ({"count": 9}, None),
            # The share of CPUs and memory that goes with `count` of the machine's GPUs.
            ({"count": 1, "cpus": 16}, "3090"),
            ({"count": 1, "cpus": 17}, None),  # 3090: 32 / 2; a100: 16 / 4; h100: 64 / 8
            ({"count": 8, "cpus": 64}, "h100"),
            ({"count": 4, "cpus": 16}, "a100"),
            ({"count": 1, "memory_mb": 65536}, "4090d"),  # 3090's memory is unknown
            ({"count": 1, "memory_mb": 65536, "cpus": 1}, "h100"),  # 4090d: CPUs unknown
            ({"count": 1, "allow_simulated": True}, "sim"),
            ({"count": 1, "avoid": frozenset({"3090", "4090d"})}, "a100"),
        ],
    )
    def test_each_field(self, index: FleetIndex, demand: dict, expected: str | None) -> None:
        assert chosen(index, **demand) == expected

    def test_count_below_one_counts_as_one(self, index: FleetIndex) -> None:
        assert chosen(index, count=0) == "3090"


class TestUpdates:
    def test_take_and_release(self) -> None:
        index = index_of(machine("a", gpus(2, prefix="a", price=0.4)), machine("b", gpus(2)))
        index.take("a", ["a-RTX 4090-0"])
        assert chosen(index, count=2) == "b"
        assert chosen(index, count=1) == "a"
        index.take("a", ["a-RTX 4090-0", "a-RTX 4090-1"])  # taking twice counts once
        assert chosen(index, count=1) == "b"
        index.release("a", ["a-RTX 4090-1", "unknown"])
        assert chosen(index, count=1) == "a"
        assert chosen(index, count=2) == "b"
        index.release("a", ["a-RTX 4090-0", "a-RTX 4090-0"])
        assert chosen(index, count=2) == "a"
        index.take("nobody", ["x"])  # unknown machines are ignored

    def test_take_updates_packing(self) -> None:
        index = index_of(machine("a", gpus(4, prefix="a")), machine("b", gpus(4, prefix="b")))
        index.take("b", ["b-RTX 4090-0"])
        assert chosen(index, count=1) == "b"
        index.release("b", ["b-RTX 4090-0"])
        index.take("a", ["a-RTX 4090-3"])
        assert chosen(index, count=1) == "a"

    def test_broken_gpus_stay_unavailable_through_take_and_release(self) -> None:
        index = index_of(machine("a", gpus(2, prefix="a", unhealthy=1)))
        index.take("a", ["a-RTX 4090-1"])
        assert chosen(index, count=1) == "a"
        index.release("a", ["a-RTX 4090-1"])
        assert chosen(index, count=2) is None

    def test_pick_names_free_healthy_gpus_of_the_pool_and_takes_them(self) -> None:
        index = index_of(
            machine(
                "a",
                gpus(3, prefix="a", reserved=1, unhealthy=1),
                gpus(2, "A100", prefix="a"),
            )
        )
        choice = index.choose(Demand(count=1, models=("RTX 4090",)))
        assert choice is not None
        assert index.pick(choice, 1) == ["a-RTX 4090-1"]
        # Taken: the next decision of the pass sees it gone.
        assert chosen(index, count=1, models=("RTX 4090",)) is None
        assert index.pick(choice, 1) is None
        a100 = index.choose(Demand(count=2, models=("A100",)))
        assert a100 is not None and index.pick(a100, 2) == ["a-A100-0", "a-A100-1"]
        # A pick Postgres refused is given back.
        index.release("a", ["a-A100-0", "a-A100-1"])
        assert chosen(index, count=2, models=("A100",)) == "a"
        gone = replace(a100, provider_id="nobody")
        assert index.pick(gone, 1) is None

    def test_upsert_replaces_everything(self) -> None:
        index = index_of(
            machine("a", gpus(4, "H100", "a"), region="us-east", labels={"tier": "gold"})
        )
        index.upsert(machine("a", gpus(2, "A100", "a"), region="eu-west", labels={"x": "y"}))
        assert len(index) == 1 and "a" in index
        assert chosen(index, count=1, models=("H100",)) is None
        assert chosen(index, count=3) is None
        assert chosen(index, count=2, models=("A100",)) == "a"
        assert chosen(index, count=1, region="us-east") is None
        assert chosen(index, count=1, labels=(("tier", "gold"),)) is None
        assert chosen(index, count=1, labels=(("x", "y"),)) == "a"
        index.upsert(machine("a", gpus(2, "A100", "a"), schedulable=False))
        assert chosen(index, count=1) is None

    def test_a_machine_without_gpus_is_known_but_offers_nothing(self) -> None:
        index = FleetIndex()
        index.upsert(replace(machine("a"), gpus=()))
        assert "a" in index and len(index) == 1
        assert chosen(index, count=1) is None

    def test_remove_and_reuse_rows(self) -> None:
        index = index_of(
            machine("a", gpus(2, prefix="a"), labels={"tier": "gold"}, region="us-east")
        )
        index.remove("a")
        index.remove("a")
        assert len(index) == 0 and "a" not in index
        assert chosen(index, count=1) is None
        index.upsert(machine("b", gpus(2, prefix="b")))
        assert chosen(index, count=1) == "b"
        # The row "a" left behind carries none of its labels or region to "b".
        assert chosen(index, count=1, labels=(("tier", "gold"),)) is None
        assert chosen(index, count=1, region="us-east") is None

    def test_grows_past_its_first_allocation(self) -> None:
        index = FleetIndex()
        for i in range(3000):
            index.upsert(machine(f"m{i:04d}", gpus(1, prefix=str(i), price=1 + i / 10000)))
        assert len(index) == 3000
        for i in range(0, 3000, 2):
            index.remove(f"m{i:04d}")
        assert chosen(index, count=1) == "m0001"
        assert chosen(index, count=1, max_price_per_hour=1.00005) is None

    def test_load_replaces_the_content(self) -> None:
        index = index_of(machine("old"))
        index.load(FleetSnapshot.from_machines([machine("new", gpus(3, prefix="n"))]))
        assert len(index) == 1 and "old" not in index
        assert chosen(index, count=3) == "new"


class TestWhyUnplaceable:
    def test_an_empty_fleet(self) -> None:
        why = FleetIndex().why_unplaceable(Demand(count=1))
        assert why == (
            "no provider in the fleet has any GPU (simulated GPUs are not offered to real jobs)"
        )
        sim = index_of(machine("s", simulated=True))
        assert sim.why_unplaceable(Demand(count=1)).startswith("no provider in the fleet has any")
        assert sim.why_unplaceable(Demand(count=1, allow_simulated=True)) is None
        assert "simulated" not in FleetIndex().why_unplaceable(
            Demand(count=1, allow_simulated=True)
        )

    def test_busy_offline_and_broken_machines_still_count(self) -> None:
        index = index_of(
            machine("busy", gpus(2, prefix="b", reserved=2)),
            machine("off", gpus(4, prefix="o"), schedulable=False),
            machine("broken", gpus(8, prefix="k", unhealthy=8)),
        )
        for count in (2, 4, 8):
            assert index.choose(Demand(count=count)) is None
            assert index.why_unplaceable(Demand(count=count)) is None

    def test_names_the_first_constraint_nothing_meets(self) -> None:
        index = index_of(
            machine(
                "m",
                gpus(2, "RTX 4090", vram_mb=24576, cc=8009, price=0.5),
                region="eu-west",
                labels={"tier": "gold"},
                cuda_version=12004,
                cpu_count=16,
                memory_mb=65536,
            )
        )

        def why(**kw) -> str | None:  # type: ignore[no-untyped-def]
            return index.why_unplaceable(Demand(**kw))

        start = "no provider in the fleet has a GPU "
        assert why(count=2) is None
        assert why(count=1, models=("H100", "A100")) == start + "of model H100 or A100"
        assert why(count=1, models=("RTX 4090",), min_vram_mb=48 * 1024) == (
            start + "of model RTX 4090 with at least 48 GiB of memory"
        )
        assert why(count=1, min_compute_capability=9000) == (
            start + "with compute capability 9.0 or newer"
        )
        assert (
            why(count=1, min_cuda_version=12010) == start + "on a machine with CUDA 12.10 or newer"
        )
        assert why(count=1, max_price_per_hour=0.1) == start + "at or under 0.1 per GPU-hour"
        assert why(count=1, region="us-east") == start + "in region us-east"
        assert why(count=1, labels=(("tier", "silver"),)) == start + "labelled tier=silver"
        assert why(count=1, labels=(("rack", "1"),)) == start + "labelled rack=1"
        assert why(count=1, cpus=9) == start + "on a machine that can spare 9 CPUs for 1 GPU"
        assert why(count=2, cpus=16) is None
        assert why(count=1, memory_mb=40 * 1024) == (
            start + "on a machine that can spare 40 GiB of RAM for 1 GPU"
        )
        assert why(count=3) == "no provider in the fleet has 3 such GPUs on one machine"
        # The first failing constraint is named, with the ones before it.
        assert why(count=1, min_vram_mb=1024, max_price_per_hour=0.1, region="mars") == (
            start + "with at least 1 GiB of memory at or under 0.1 per GPU-hour"
        )
        # A CPU share that only the whole machine gives is a count problem.
        assert why(count=4, cpus=32) == "no provider in the fleet has 4 such GPUs on one machine"

    def test_machines_that_failed_the_job(self) -> None:
        index = index_of(machine("a", gpus(2, prefix="a")), machine("b", gpus(1, prefix="b")))
        assert index.why_unplaceable(Demand(count=2, avoid=frozenset({"a"}))) == (
            INFRASTRUCTURE_FAULTS
        )
        assert index.why_unplaceable(Demand(count=1, avoid=frozenset({"a"}))) is None
        assert index.why_unplaceable(Demand(count=3, avoid=frozenset({"a"}))) == (
            "no provider in the fleet has 3 such GPUs on one machine"
        )


# A naive reference: the same rules, one machine at a time, in plain Python.


def _pools(m: MachineView, healthy_only: bool) -> dict[str, list[GpuView]]:
    pools: dict[str, list[GpuView]] = {}
    for g in m.gpus:
        if g.healthy or not healthy_only:
            pools.setdefault(g.model, []).append(g)
    return pools


def _fits(m: MachineView, model: str, members: list[GpuView], d: Demand) -> bool:
    cc = [-1 if g.compute_capability is None else g.compute_capability for g in members]
    count = max(1, d.count)
    return (
        (not d.models or any(model_matches(r, model) for r in d.models))
        and (not d.min_vram_mb or min(g.vram_mb for g in members) >= d.min_vram_mb)
        and (d.min_compute_capability is None or min(cc) >= d.min_compute_capability)
        and (d.min_cuda_version is None or (m.cuda_version or -1) >= d.min_cuda_version)
        and (
            d.max_price_per_hour is None
            or max(g.price_per_hour for g in members) <= d.max_price_per_hour
        )
        and (d.region is None or m.region == d.region)
        and all(m.labels.get(k) == v for k, v in d.labels)
        and (
            not d.cpus or (m.cpu_count is not None and m.cpu_count * count >= d.cpus * len(m.gpus))
        )
        and (
            not d.memory_mb
            or (m.memory_mb is not None and m.memory_mb * count >= d.memory_mb * len(m.gpus))
        )
        and (d.allow_simulated or not m.simulated)
    )


def naive_scores(machines: list[MachineView], d: Demand, w: Weights) -> dict[str, float]:
    count = max(1, d.count)
    scores: dict[str, float] = {}
    for m in machines:
        if not m.schedulable or m.provider_id in d.avoid:
            continue
        machine_free = sum(1 for g in m.gpus if g.healthy and not g.reserved)
        for model, members in _pools(m, healthy_only=True).items():
            free = sum(1 for g in members if not g.reserved)
            if free < count or not _fits(m, model, members, d):
                continue
            price = max(g.price_per_hour for g in members)
            score = (
                w.price * price
                + w.reliability * (1 - m.reliability)
                + w.packing * (machine_free - count) / len(m.gpus)
            )
            scores[m.provider_id] = min(score, scores.get(m.provider_id, math.inf))
    return scores


def naive_could_run(machines: list[MachineView], d: Demand) -> set[str]:
    return {
        m.provider_id
        for m in machines
        for model, members in _pools(m, healthy_only=False).items()
        if len(members) >= max(1, d.count) and _fits(m, model, members, d)
    }


def random_fleet(rng: random.Random, size: int) -> list[MachineView]:
    models = ["H100 80GB HBM3", "H100 PCIE", "A100-SXM4-80GB", "RTX 4090", "RTX 4090 D", "T4"]
    fleet = []
    for i in range(size):
        groups = []
        for j in range(rng.choice((1, 1, 1, 2))):
            n = rng.randint(1, 8)
            groups.append(
                tuple(
                    GpuView(
                        uuid=f"m{i}-{j}-{k}",
                        index=j * 10 + k,
                        model=rng.choice(models),
                        vram_mb=rng.choice((16384, 24576, 81920)),
                        compute_capability=rng.choice((7005, 8009, 9000, None)),
                        price_per_hour=rng.choice((0.2, 0.5, 1.0, 2.5)),
                        healthy=rng.random() > 0.1,
                        reserved=rng.random() < 0.3,
                    )
                    for k in range(n)
                )
            )
        fleet.append(
            MachineView(
                provider_id=f"m{i:03d}",
                schedulable=rng.random() > 0.2,
                simulated=rng.random() < 0.1,
                region=rng.choice(("eu", "us", None)),
                labels=rng.choice(({}, {"tier": "gold"}, {"tier": "silver", "nvlink": "yes"})),
                reliability=rng.choice((0.9, 0.95, 1.0)),
                cuda_version=rng.choice((11008, 12004, None)),
                cpu_count=rng.choice((8, 32, None)),
                memory_mb=rng.choice((65536, 262144, None)),
                gpus=tuple(g for group in groups for g in group),
            )
        )
    return fleet


def random_demand(rng: random.Random, fleet: list[MachineView]) -> Demand:
    def maybe(*values):  # type: ignore[no-untyped-def]
        """Mostly unset, so that a fair share of demands can be placed."""
        return rng.choice(values) if rng.random() < 0.25 else None

    return Demand(
        count=rng.choice((1, 1, 2, 4, 8)),
        models=maybe(("H100",), ("RTX 4090",), ("A100 80GB", "T4"), ("B200",)) or (),
        min_vram_mb=maybe(24576, 81920),
        min_compute_capability=maybe(8009, 9000),
        min_cuda_version=maybe(12004),
        max_price_per_hour=maybe(0.5, 1.0),
        region=maybe("eu", "mars"),
        labels=maybe((("tier", "gold"),), (("nvlink", "yes"),)) or (),
        cpus=maybe(4, 16),
        memory_mb=maybe(32768),
        allow_simulated=rng.random() < 0.3,
        avoid=frozenset(rng.sample([m.provider_id for m in fleet], 3)),
    )


class TestAgainstNaiveReference:
    @pytest.mark.parametrize("seed", range(5))
    def test_random_fleets_and_demands(self, seed: int) -> None:
        rng = random.Random(seed)
        fleet = random_fleet(rng, 60)
        index = index_of(*fleet)
        # Churn: reload some, remove and add back some, take some GPUs, release half.
        for m in rng.sample(fleet, 10):
            index.upsert(m)
        for m in fleet[:5]:
            index.remove(m.provider_id)
            index.upsert(m)
        free = [(m.provider_id, g.uuid) for m in fleet for g in m.gpus if not g.reserved]
        sample = rng.sample(free, 30)
        for provider_id, uuid in sample:
            index.take(provider_id, [uuid])
        for provider_id, uuid in sample[:15]:
            index.release(provider_id, [uuid])
        held = set(sample[15:])
        fleet = [
            replace(
                m,
                gpus=tuple(
                    replace(g, reserved=True) if (m.provider_id, g.uuid) in held else g
                    for g in m.gpus
                ),
            )
            for m in fleet
        ]
        weights = Weights()
        for _ in range(300):
            demand = random_demand(rng, fleet)
            scores = naive_scores(fleet, demand, weights)
            choice = index.choose(demand)
            if not scores:
                assert choice is None, demand
            else:
                best = min(scores.values())
                assert choice is not None, demand
                assert choice.score == pytest.approx(best)
                assert scores[choice.provider_id] == pytest.approx(best)
            could = naive_could_run(fleet, demand)
            why = index.why_unplaceable(demand)
            if could - demand.avoid:
                assert why is None, demand
            elif could:
                assert why == INFRASTRUCTURE_FAULTS
            else:
                assert why is not None and why.startswith("no provider in the fleet has"), why


class TestTimings:
    def test_decision_timings_reports_percentiles(self) -> None:
        timings = decision_timings(2000, samples=50)
        assert {"p50_ms", "p99_ms", "max_ms"} <= timings.keys()
        assert 0 < timings["p50_ms"] <= timings["p99_ms"] <= timings["max_ms"]

    def test_synthetic_fleet_answers(self) -> None:
        index = synthetic_fleet(1000)
        assert len(index) == 1000
        assert index.choose(Demand(count=1)) is not None
        assert index.choose(Demand(count=1, models=("B300",))) is None
