from types import SimpleNamespace
from typing import Any

import pytest

from provider_daemon.errors import NvmlUnavailable, SimulateSpecError
from provider_daemon.gpus import NvmlGpus, SimulatedGpus, open_gpus, parse_simulate

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


class NvmlNotSupported(Exception):
    pass


def fake_nvml(**overrides: Any) -> SimpleNamespace:
    """Just enough of pynvml's surface for two GPUs; ECC unsupported on the second."""
    handles = ["h0", "h1"]

    def ecc(handle: str, *_: int) -> int:
        if handle == "h1":
            raise NvmlNotSupported("Not Supported")
        return 2

    nvml = SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 4090" if h == "h0" else "NVIDIA A100",
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=24 * 2**30, used=3 * 2**30),
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 9),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=42, memory=10),
        nvmlDeviceGetTemperature=lambda h, sensor: 61,
        nvmlDeviceGetPowerUsage=lambda h: 250_500,
        nvmlDeviceGetTotalEccErrors=ecc,
    )
    for name, value in overrides.items():
        setattr(nvml, name, value)
    return nvml


class TestNvml:
    def test_inventory_and_metrics(self) -> None:
        gpus = NvmlGpus(fake_nvml())
        inventory = gpus.inventory()
        assert not inventory.simulated
        assert (inventory.driver_version, inventory.cuda_version) == ("550.54.15", "12.4")
        first = inventory.gpus[0]
        assert (first.uuid, first.model, first.vram_mb, first.compute_capability) == (
            "GPU-h0",
            "NVIDIA GeForce RTX 4090",
            24 * 1024,
            "8.9",
        )
        m0, m1 = gpus.metrics(set())
        assert (m0.utilization_pct, m0.memory_used_mb, m0.temperature_c, m0.power_w) == (
            42.0,
            3 * 1024,
            61.0,
            250.5,
        )
        assert (m0.ecc_errors, m1.ecc_errors) == (2, None)

    def test_nvml_failing_to_load_is_a_clear_error(self) -> None:
        def init() -> None:
            raise OSError("NVML Shared Library Not Found")

        with pytest.raises(NvmlUnavailable) as caught:
            NvmlGpus(fake_nvml(nvmlInit=init))
        assert str(caught.value) == (
            "NVML not available (NVML Shared Library Not Found) and --simulate not given"
        )

    def test_no_gpu_is_a_clear_error(self) -> None:
        with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
            NvmlGpus(fake_nvml(nvmlDeviceGetCount=lambda: 0))

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
