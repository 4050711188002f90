from collections.abc import Iterator

import pynvml
import pytest

from provider_daemon.errors import NvmlUnavailable, SimulateSpecError
from provider_daemon.gpus import GpuInfo, NvmlGpus, SimulatedGpus, open_gpus, parse_simulate
from tests.provider_daemon.recorded_nvml import (
    H100_80GB_HBM3,
    RTX_4090,
    RTX_5090,
    RTX_5090_HOST,
    RecordedNvml,
)

MACHINE = "5b7c1f0e-0c1a-4d43-9a43-3f3c0b7d8a11"


class TestParseSimulate:
    def test_known_models_take_vram_from_the_table(self) -> None:
        parsed = parse_simulate("RTX 4090:2, a100:1")
        assert [(p.model, p.count, p.vram_gb) for p in parsed] == [
            ("RTX 4090", 2, 24),
            ("A100", 1, 80),
        ]
        assert parsed[1].compute_capability == "8.0"

    def test_unknown_model_needs_its_vram(self) -> None:
        with pytest.raises(SimulateSpecError, match="MODEL:COUNT:VRAM_GB"):
            parse_simulate("B200:1")
        (parsed,) = parse_simulate("B200:4:192")
        assert (parsed.model, parsed.count, parsed.vram_gb) == ("B200", 4, 192)
        assert parsed.compute_capability is None

    @pytest.mark.parametrize("spec", ["", "RTX 4090", "RTX 4090:0", "RTX 4090:x", ":2", "T4:1:0"])
    def test_bad_specs_say_what_is_wrong(self, spec: str) -> None:
        with pytest.raises(SimulateSpecError, match="--simulate"):
            parse_simulate(spec)


class TestSimulatedGpus:
    def test_inventory(self) -> None:
        inventory = SimulatedGpus("RTX 4090:2,T4:1", MACHINE).inventory()
        assert inventory.simulated
        assert [(g.index, g.model, g.vram_mb) for g in inventory.gpus] == [
            (0, "RTX 4090", 24 * 1024),
            (1, "RTX 4090", 24 * 1024),
            (2, "T4", 16 * 1024),
        ]
        assert all(g.uuid.startswith("GPU-sim-") for g in inventory.gpus)
        assert len(inventory.uuids) == 3

    def test_uuids_are_stable_per_machine(self) -> None:
        first = SimulatedGpus("L4:2", MACHINE).inventory().uuids
        assert SimulatedGpus("L4:2", MACHINE).inventory().uuids == first
        other = SimulatedGpus("L4:2", "9f1d2c3b-0000-4000-8000-000000000000").inventory()
        assert other.uuids.isdisjoint(first)

    def test_busy_gpus_look_busy(self) -> None:
        gpus = SimulatedGpus("H100:2", MACHINE)
        busy_uuid, idle_uuid = (g.uuid for g in gpus.inventory().gpus)
        for _ in range(20):
            by_uuid = {m.uuid: m for m in gpus.metrics({busy_uuid})}
            busy, idle = by_uuid[busy_uuid], by_uuid[idle_uuid]
            assert busy.utilization_pct is not None and busy.utilization_pct >= 80
            assert idle.utilization_pct is not None and idle.utilization_pct <= 5
            assert busy.memory_used_mb and idle.memory_used_mb is not None
            assert busy.memory_used_mb > idle.memory_used_mb
            assert busy.power_w and idle.power_w and busy.power_w > idle.power_w
            assert busy.ecc_errors == 0
            assert busy.healthy and idle.healthy

    def test_a_fault_makes_one_gpu_unhealthy_until_cleared(self) -> None:
        gpus = SimulatedGpus("RTX 4090:2", MACHINE)
        sick, well = (g.uuid for g in gpus.inventory().gpus)
        gpus.set_fault(sick, "fan failure; replace the fan")
        by_uuid = {m.uuid: m for m in gpus.metrics(set())}
        assert (by_uuid[sick].healthy, by_uuid[sick].health_reason) == (
            False,
            "fan failure; replace the fan",
        )
        assert (by_uuid[well].healthy, by_uuid[well].health_reason) == (True, None)
        assert gpus.unhealthy() == {sick: "fan failure; replace the fan"}

        gpus.set_fault(sick, None)
        assert all(m.healthy and m.health_reason is None for m in gpus.metrics(set()))
        assert gpus.unhealthy() == {}

    def test_a_fault_on_an_unknown_gpu_is_refused(self) -> None:
        with pytest.raises(ValueError, match="GPU-nope"):
            SimulatedGpus("T4:1", MACHINE).set_fault("GPU-nope", "broken")


@pytest.fixture
def h100_and_4090() -> Iterator[tuple[RecordedNvml, NvmlGpus]]:
    nvml = RecordedNvml([H100_80GB_HBM3, RTX_4090])
    gpus = NvmlGpus(nvml)
    yield nvml, gpus
    gpus.close()


class TestNvmlInventory:
    def test_data_center_and_consumer_gpus(
        self, h100_and_4090: tuple[RecordedNvml, NvmlGpus]
    ) -> None:
        _, gpus = h100_and_4090
        inventory = gpus.inventory()
        assert not inventory.simulated
        assert (inventory.driver_version, inventory.cuda_version) == ("545.23.08", "12.3")
        assert inventory.gpus == [
            GpuInfo(
                index=0,
                uuid="GPU-10f35015-e921-bfab-2eb8-4e9b6664d5f1",
                model="NVIDIA H100 80GB HBM3",
                vram_mb=81559,
                compute_capability="9.0",
                pcie_gen=5,
                pcie_width=16,
            ),
            GpuInfo(
                index=1,
                uuid="GPU-b9029ae5-75ac-6ded-3592-fc695a3f8c1a",
                model="NVIDIA GeForce RTX 4090",
                vram_mb=24564,
                compute_capability="8.9",
                # The maximum the host allows (PCIe 3), not the card's own gen 4.
                pcie_gen=3,
                pcie_width=16,
            ),
        ]

    def test_newer_driver_and_blackwell(self) -> None:
        gpus = NvmlGpus(RecordedNvml([RTX_5090], host=RTX_5090_HOST))
        try:
            inventory = gpus.inventory()
            assert (inventory.driver_version, inventory.cuda_version) == ("570.124.06", "12.8")
            (gpu,) = inventory.gpus
            assert (gpu.vram_mb, gpu.compute_capability, gpu.pcie_gen, gpu.pcie_width) == (
                32607,
                "12.0",
                5,
                16,
            )
        finally:
            gpus.close()

    def test_unsupported_readings_become_none(self) -> None:
        nvml = RecordedNvml([H100_80GB_HBM3, RTX_4090])

        def not_supported(handle: object) -> int:
            raise pynvml.NVMLError_NotSupported()

        nvml.nvmlDeviceGetMaxPcieLinkGeneration = not_supported
        nvml.nvmlDeviceGetCudaComputeCapability = not_supported
        nvml.nvmlSystemGetCudaDriverVersion = lambda: not_supported(None)
        gpus = NvmlGpus(nvml)
        try:
            inventory = gpus.inventory()
            assert inventory.cuda_version is None
            assert [(g.compute_capability, g.pcie_gen, g.pcie_width) for g in inventory.gpus] == [
                (None, None, 16),
                (None, None, 16),
            ]
            assert [g.vram_mb for g in inventory.gpus] == [81559, 24564]
        finally:
            gpus.close()


class TestNvmlMetrics:
    def test_readings_from_both_recordings(
        self, h100_and_4090: tuple[RecordedNvml, NvmlGpus]
    ) -> None:
        _, gpus = h100_and_4090
        h100, rtx = gpus.metrics(set())
        assert h100.model_dump() == {
            "uuid": H100_80GB_HBM3.uuid,
            "utilization_pct": 0.0,
            # NVML's v1 "used" includes the driver's 328 MiB reservation.
            "memory_used_mb": 332,
            "temperature_c": 33.0,
            "power_w": 72.02,
            "ecc_errors": 0,
            "xid_errors": 0,
            "healthy": True,
            "health_reason": None,
        }
        assert rtx.model_dump() == {
            "uuid": RTX_4090.uuid,
            "utilization_pct": 34.0,
            "memory_used_mb": 965,
            "temperature_c": 40.0,
            "power_w": 27.98,
            "ecc_errors": None,  # ECC disabled on this card
            "xid_errors": 0,
            "healthy": True,
            "health_reason": None,
        }

    def test_a_gpu_without_ecc_remapping_or_retirement_is_healthy(self) -> None:
        gpus = NvmlGpus(RecordedNvml([RTX_5090], host=RTX_5090_HOST))
        try:
            (m,) = gpus.metrics(set())
            assert (m.ecc_errors, m.healthy, m.memory_used_mb, m.power_w) == (
                None,
                True,
                488,
                24.05,
            )
        finally:
            gpus.close()

    def test_one_failing_reading_leaves_the_others(
        self, h100_and_4090: tuple[RecordedNvml, NvmlGpus]
    ) -> None:
        nvml, gpus = h100_and_4090

        def unknown_error(handle: object) -> int:
            raise pynvml.NVMLError_Unknown()

        nvml.nvmlDeviceGetPowerUsage = unknown_error
        h100, _ = gpus.metrics(set())
        assert (h100.power_w, h100.temperature_c, h100.ecc_errors, h100.healthy) == (
            None,
            33.0,
            0,
            True,
        )


class TestNvmlStartup:
    def test_nvml_failing_to_load_is_a_clear_error(self) -> None:
        nvml = RecordedNvml([RTX_4090])

        def init() -> None:
            raise pynvml.NVMLError_LibraryNotFound()

        nvml.nvmlInit = init
        with pytest.raises(NvmlUnavailable) as caught:
            NvmlGpus(nvml)
        assert str(caught.value) == (
            "NVML not available (NVML Shared Library Not Found) and --simulate not given"
        )

    def test_no_gpu_is_a_clear_error(self) -> None:
        nvml = RecordedNvml([])
        with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
            NvmlGpus(nvml)
        assert not nvml.initialized

    def test_close_shuts_nvml_down(self) -> None:
        nvml = RecordedNvml([RTX_4090])
        NvmlGpus(nvml).close()
        assert not nvml.initialized

    def test_this_machine_without_a_driver(self) -> None:
        try:
            gpus = open_gpus(None, MACHINE)
        except NvmlUnavailable as exc:
            assert "--simulate not given" in str(exc)
        else:  # a machine with a real NVIDIA driver
            assert gpus.inventory().gpus
            gpus.close()

    def test_simulate_wins_over_nvml(self) -> None:
        assert open_gpus("T4:1", MACHINE).inventory().simulated
