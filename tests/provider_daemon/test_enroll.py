import pytest

from provider_daemon.enroll import (
    build_join_request,
    join,
    parse_labels,
    parse_price_items,
    parse_prices,
)
from provider_daemon.errors import JoinError
from provider_daemon.gpus import SimulatedGpus
from tests.provider_daemon.conftest import FakeGateway

MACHINE = "5b7c1f0e-0c1a-4d43-9a43-3f3c0b7d8a11"
INVENTORY = SimulatedGpus("RTX 4090:2,A100:1", MACHINE).inventory()


class TestPrices:
    def test_every_model_gets_a_price(self) -> None:
        assert parse_prices(["a100=1.75"], INVENTORY) == {"A100": 1.75, "RTX 4090": 0.5}

    @pytest.mark.parametrize(
        ("item", "message"),
        [
            ("A100", "MODEL=USD_PER_GPU_HOUR"),
            ("A100=cheap", "not a number"),
            ("A100=-1", "non-negative"),
            ("T4=0.2", "no GPU of model 'T4'"),
        ],
    )
    def test_bad_prices(self, item: str, message: str) -> None:
        with pytest.raises(JoinError, match=message):
            parse_prices([item], INVENTORY)

    def test_a_rejoin_keeps_the_saved_prices_unless_given(self) -> None:
        saved = {"A100": 1.5, "RTX 4090": 0.45, "T4": 0.1}
        assert parse_prices([], INVENTORY, saved) == {"A100": 1.5, "RTX 4090": 0.45}
        assert parse_prices(["A100=2"], INVENTORY, saved) == {"A100": 2.0, "RTX 4090": 0.45}

    def test_price_items_as_written(self) -> None:
        # `price set` leaves matching models to the platform, which knows the machine.
        assert parse_price_items(["rtx 4090 = 0.45", "A100=1"], option="price set") == {
            "rtx 4090": 0.45,
            "A100": 1.0,
        }
        with pytest.raises(JoinError, match=r"^price set: 'A100' is not MODEL="):
            parse_price_items(["A100"], option="price set")


def join_body(token: str = "good-token") -> dict:
    return build_join_request(
        token=token,
        machine_id=MACHINE,
        name="rig-1",
        region="eu-west",
        inventory=INVENTORY,
        prices=parse_prices([], INVENTORY),
    )


class TestJoin:
    def test_request_body(self) -> None:
        body = join_body()
        assert body["simulated"] is True
        assert body["machine_id"] == MACHINE
        assert body["gpus"][2] == {
            "uuid": INVENTORY.gpus[2].uuid,
            "index": 2,
            "model": "A100",
            "vram_mb": 80 * 1024,
            "compute_capability": "8.0",
            # Simulated GPUs have no PCIe link to speak of.
            "pcie_gen": None,
            "pcie_width": None,
        }
        assert body["labels"] == {}
        assert body["prices"] == {"A100": 0.5, "RTX 4090": 0.5}

    async def test_join_returns_the_identity(self, gateway: FakeGateway) -> None:
        joined = await join(gateway.url + "/", join_body())
        assert joined.credential == gateway.credential
        assert joined.nats_url == gateway.nats_url
        assert gateway.joins[-1]["name"] == "rig-1"

    async def test_refusal_carries_the_servers_detail(self, gateway: FakeGateway) -> None:
        with pytest.raises(JoinError) as caught:
            await join(gateway.url, join_body("expired-token"))
        assert str(caught.value) == "join failed: join token expired (HTTP 403)"

    async def test_unreachable_api(self) -> None:
        with pytest.raises(JoinError, match="join failed: cannot reach"):
            await join("http://127.0.0.1:9", join_body(), timeout_s=2)


def test_labels_parse_and_bad_ones_say_why() -> None:
    assert parse_labels(["tier=3", " nvlink = yes "]) == {"tier": "3", "nvlink": "yes"}
    with pytest.raises(JoinError, match="KEY=VALUE"):
        parse_labels(["tier"])
