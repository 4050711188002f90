"""GPU inventory and live metrics: NVML on a real machine, a plausible simulation otherwise."""

import random
import re
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from common.messages import GpuMetrics
from provider_daemon.errors import NvmlUnavailable, SimulateSpecError


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    model: str
    vram_mb: int
    compute_capability: str | None


@dataclass(frozen=True)
class Inventory:
    gpus: list[GpuInfo]
    driver_version: str | None
    cuda_version: str | None
    simulated: bool

    @property
    def uuids(self) -> set[str]:
        return {g.uuid for g in self.gpus}


class GpuSource(Protocol):
    def inventory(self) -> Inventory: ...

    def metrics(self, busy: set[str]) -> list[GpuMetrics]:
        """Current metrics per GPU; `busy` holds the UUIDs a job of ours runs on."""
        ...

    def close(self) -> None: ...


# --- NVML ---------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpus:
    """Reads the real GPUs through NVML (nvidia-ml-py); `nvml` is injectable for tests."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        if nvml is None:
            try:
                import pynvml  # the module that nvidia-ml-py installs
            except ImportError as exc:
                raise NvmlUnavailable(
                    f"NVML not available (nvidia-ml-py not installed: {exc}) "
                    "and --simulate not given"
                ) from None
            nvml = pynvml
        self.nvml: Any = nvml
        try:
            self.nvml.nvmlInit()
        except Exception as exc:
            raise NvmlUnavailable(f"NVML not available ({exc}) and --simulate not given") from None
        try:
            self._inventory = self._read_inventory()
        except Exception as exc:
            self.close()
            raise NvmlUnavailable(f"NVML failed while listing GPUs: {exc}") from None
        if not self._inventory.gpus:
            self.close()
            raise NvmlUnavailable("NVML found no NVIDIA GPU on this machine")
        self._handles = {
            g.uuid: self.nvml.nvmlDeviceGetHandleByIndex(g.index) for g in self._inventory.gpus
        }

    def _read_inventory(self) -> Inventory:
        nvml = self.nvml
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda: str | None
        try:
            raw = int(nvml.nvmlSystemGetCudaDriverVersion())
            cuda = f"{raw // 1000}.{(raw % 1000) // 10}"
        except Exception:
            cuda = None
        gpus: list[GpuInfo] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            capability: str | None
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability = f"{major}.{minor}"
            except Exception:
                capability = None
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    model=_text(nvml.nvmlDeviceGetName(handle)),
                    vram_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20,
                    compute_capability=capability,
                )
            )
        return Inventory(gpus=gpus, driver_version=driver, cuda_version=cuda, simulated=False)

    def inventory(self) -> Inventory:
        return self._inventory

    def metrics(self, busy: set[str]) -> list[GpuMetrics]:
        nvml = self.nvml

        def read(fn: Any, *args: Any) -> Any:
            # A GPU that does not support one reading (ECC on consumer cards) still
            # reports the others.
            try:
                return fn(*args)
            except Exception:
                return None

        out: list[GpuMetrics] = []
        for gpu_uuid, handle in self._handles.items():
            util = read(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = read(nvml.nvmlDeviceGetMemoryInfo, handle)
            temp = read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = read(nvml.nvmlDeviceGetPowerUsage, handle)
            ecc = read(
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                nvml.NVML_VOLATILE_ECC,
            )
            out.append(
                GpuMetrics(
                    uuid=gpu_uuid,
                    utilization_pct=float(util.gpu) if util is not None else None,
                    memory_used_mb=int(memory.used) // 2**20 if memory is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                    ecc_errors=int(ecc) if ecc is not None else None,
                )
            )
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


# --- simulation ---------------------------------------------------------------------


@dataclass(frozen=True)
class KnownModel:
    name: str
    vram_gb: int
    compute_capability: str
    power_w: float


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name.lower(): m
    for m in (
        KnownModel("RTX 4090", 24, "8.9", 450.0),
        KnownModel("RTX 3090", 24, "8.6", 350.0),
        KnownModel("A100", 80, "8.0", 400.0),
        KnownModel("H100", 80, "9.0", 700.0),
        KnownModel("L4", 24, "8.9", 72.0),
        KnownModel("A10", 24, "8.6", 150.0),
        KnownModel("T4", 16, "7.5", 70.0),
    )
}


@dataclass(frozen=True)
class SimulatedModel:
    model: str
    count: int
    vram_gb: int
    compute_capability: str | None
    power_w: float


def parse_simulate(spec: str) -> list[SimulatedModel]:
    """Parses "MODEL:COUNT[,MODEL:COUNT]"; unknown models need "MODEL:COUNT:VRAM_GB"."""
    parsed: list[SimulatedModel] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        fields = [f.strip() for f in part.split(":")]
        if len(fields) not in (2, 3) or not fields[0]:
            raise SimulateSpecError(
                f"--simulate: {part!r} is not MODEL:COUNT or MODEL:COUNT:VRAM_GB"
            )
        model, count_text = fields[0], fields[1]
        if not re.fullmatch(r"[1-9]\d*", count_text):
            raise SimulateSpecError(f"--simulate: count in {part!r} must be a positive integer")
        known = KNOWN_MODELS.get(model.lower())
        if len(fields) == 3:
            if not re.fullmatch(r"[1-9]\d*", fields[2]):
                raise SimulateSpecError(
                    f"--simulate: VRAM_GB in {part!r} must be a positive integer"
                )
            vram_gb = int(fields[2])
        elif known is not None:
            vram_gb = known.vram_gb
        else:
            names = ", ".join(m.name for m in KNOWN_MODELS.values())
            raise SimulateSpecError(
                f"--simulate: unknown model {model!r}; give its memory as "
                f"MODEL:COUNT:VRAM_GB (known models: {names})"
            )
        parsed.append(
            SimulatedModel(
                model=known.name if known else model,
                count=int(count_text),
                vram_gb=vram_gb,
                compute_capability=known.compute_capability if known else None,
                power_w=known.power_w if known else 300.0,
            )
        )
    if not parsed:
        raise SimulateSpecError("--simulate: give at least one MODEL:COUNT")
    return parsed


def simulated_uuid(machine_id: str, index: int) -> str:
    """Stable per machine, so a restarted daemon advertises the same GPUs."""
    try:
        namespace = uuid.UUID(machine_id)
    except ValueError:
        namespace = uuid.uuid5(uuid.NAMESPACE_OID, machine_id)
    return f"GPU-sim-{uuid.uuid5(namespace, str(index))}"


class SimulatedGpus:
    """GPUs that do not exist, for development and benchmarks; always flagged simulated."""

    def __init__(self, spec: str, machine_id: str) -> None:
        gpus: list[GpuInfo] = []
        self._power: dict[str, float] = {}
        for entry in parse_simulate(spec):
            for _ in range(entry.count):
                index = len(gpus)
                gpu = GpuInfo(
                    index=index,
                    uuid=simulated_uuid(machine_id, index),
                    model=entry.model,
                    vram_mb=entry.vram_gb * 1024,
                    compute_capability=entry.compute_capability,
                )
                gpus.append(gpu)
                self._power[gpu.uuid] = entry.power_w
        self._inventory = Inventory(
            gpus=gpus, driver_version=None, cuda_version=None, simulated=True
        )
        self._rng = random.Random()

    def inventory(self) -> Inventory:
        return self._inventory

    def metrics(self, busy: set[str]) -> list[GpuMetrics]:
        out: list[GpuMetrics] = []
        for gpu in self._inventory.gpus:
            load = self._rng.uniform(0.85, 0.99) if gpu.uuid in busy else self._rng.uniform(0, 0.02)
            tdp = self._power[gpu.uuid]
            out.append(
                GpuMetrics(
                    uuid=gpu.uuid,
                    utilization_pct=round(load * 100, 1),
                    memory_used_mb=int(gpu.vram_mb * (0.01 + 0.8 * load)),
                    temperature_c=round(34 + 45 * load + self._rng.uniform(-1, 1), 1),
                    power_w=round(tdp * (0.08 + 0.9 * load), 1),
                    ecc_errors=0,
                )
            )
        return out

    def close(self) -> None:
        pass


def open_gpus(simulate: str | None, machine_id: str) -> GpuSource:
    """NVML unless --simulate was given; raises NvmlUnavailable with a clear message."""
    if simulate:
        return SimulatedGpus(simulate, machine_id)
    return NvmlGpus()
