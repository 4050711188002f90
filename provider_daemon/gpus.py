"""GPU inventory and live metrics: NVML on a real machine, a plausible simulation otherwise."""

import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from common.messages import GpuMetrics
from provider_daemon.errors import NvmlUnavailable, SimulateSpecError
from provider_daemon.gpu_health import (
    DEFAULT_XID_QUARANTINE_S,
    XidWatcher,
    memory_problems,
    read_memory_health,
)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    model: str
    vram_mb: int
    compute_capability: str | None
    # The fastest PCIe link this GPU and this machine allow together, not the current link,
    # which drops to gen 1 when the GPU idles.
    pcie_gen: int | None = None
    pcie_width: int | None = None


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

    def unhealthy(self) -> dict[str, str]:
        """GPUs that must not take work now (UUID -> reason), cheap enough to ask any time."""
        ...

    def close(self) -> None: ...


# --- NVML ---------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _maybe(fn: Callable[..., Any], *args: Any) -> Any:
    """One reading, or None where this GPU does not support it (ECC on consumer cards)."""
    try:
        return fn(*args)
    except Exception:
        return None


def _positive(value: Any) -> int | None:
    if value is None:
        return None
    return int(value) or None  # NVML answers 0 where it cannot tell


class NvmlGpus:
    """Reads the real GPUs through NVML (nvidia-ml-py); `nvml` is injectable for tests."""

    def __init__(
        self,
        nvml: ModuleType | Any | None = None,
        xid_quarantine_s: float = DEFAULT_XID_QUARANTINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._xids: XidWatcher | None = None
        # Memory problems per GPU as the latest metrics() call found them.
        self._memory_problems: dict[str, list[str]] = {}
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
        self._xids = XidWatcher(
            self.nvml, self._handles, quarantine_s=xid_quarantine_s, clock=clock
        )

    def _read_inventory(self) -> Inventory:
        nvml = self.nvml
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda: str | None
        try:
            raw = int(nvml.nvmlSystemGetCudaDriverVersion())
            cuda = f"{raw // 1000}.{(raw % 1000) // 10}"
        except Exception:
            cuda = None
        gpus = [self._read_gpu(index) for index in range(nvml.nvmlDeviceGetCount())]
        return Inventory(gpus=gpus, driver_version=driver, cuda_version=cuda, simulated=False)

    def _read_gpu(self, index: int) -> GpuInfo:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        capability = _maybe(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        gen = _maybe(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)
        width = _maybe(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)
        return GpuInfo(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            model=_text(nvml.nvmlDeviceGetName(handle)),
            vram_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20,
            compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
            pcie_gen=_positive(gen),
            pcie_width=_positive(width),
        )

    def inventory(self) -> Inventory:
        return self._inventory

    def metrics(self, busy: set[str]) -> list[GpuMetrics]:
        return [self._read_metrics(gpu_uuid, handle) for gpu_uuid, handle in self._handles.items()]

    def _read_metrics(self, gpu_uuid: str, handle: Any) -> GpuMetrics:
        nvml = self.nvml
        util = _maybe(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _maybe(nvml.nvmlDeviceGetMemoryInfo, handle)
        temp = _maybe(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = _maybe(nvml.nvmlDeviceGetPowerUsage, handle)
        health = read_memory_health(nvml, handle)
        self._memory_problems[gpu_uuid] = memory_problems(health)
        reasons = self._reasons(gpu_uuid)
        return GpuMetrics(
            uuid=gpu_uuid,
            utilization_pct=float(util.gpu) if util is not None else None,
            memory_used_mb=int(memory.used) // 2**20 if memory is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            ecc_errors=health.ecc_uncorrected,
            xid_errors=self._xids.count(gpu_uuid) if self._xids else 0,
            healthy=not reasons,
            health_reason="; ".join(reasons) or None,
        )

    def _reasons(self, gpu_uuid: str) -> list[str]:
        xid = self._xids.problem(gpu_uuid) if self._xids else None
        return [*self._memory_problems.get(gpu_uuid, []), *([xid] if xid else [])]

    def unhealthy(self) -> dict[str, str]:
        """Memory problems as the latest metrics() call found them, XID quarantines as of now."""
        out: dict[str, str] = {}
        for gpu_uuid in self._handles:
            reasons = self._reasons(gpu_uuid)
            if reasons:
                out[gpu_uuid] = "; ".join(reasons)
        return out

    def close(self) -> None:
        # The event thread must be gone before NVML shuts down under it.
        if self._xids is not None:
            self._xids.close()
            self._xids = None
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
        self._faults: dict[str, str] = {}
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

    def set_fault(self, gpu_uuid: str, reason: str | None) -> None:
        """Makes one simulated GPU unhealthy for `reason`; None makes it healthy again."""
        if gpu_uuid not in self._inventory.uuids:
            raise ValueError(f"no simulated GPU {gpu_uuid}")
        if reason is None:
            self._faults.pop(gpu_uuid, None)
        else:
            self._faults[gpu_uuid] = reason

    def unhealthy(self) -> dict[str, str]:
        return dict(self._faults)

    def metrics(self, busy: set[str]) -> list[GpuMetrics]:
        faults = self.unhealthy()
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
                    healthy=gpu.uuid not in faults,
                    health_reason=faults.get(gpu.uuid),
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
