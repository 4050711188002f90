"""A pynvml stand-in that answers with readings recorded from real GPUs.

Each RecordedGpu holds what NVML reported for one real card, taken from a public `nvidia-smi -q`
dump (nvidia-smi is a thin NVML client: "N/A" there is NVML_ERROR_NOT_SUPPORTED here). RecordedNvml
serves a machine made of such cards under pynvml's own function names, return types (ctypes
structs, device handles as ctypes pointers) and exception classes, so the daemon's NVML code runs
unchanged. Tests change a reading with `set` and feed XID events with `emit_xid`.
"""

import ctypes
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pynvml

MIB = 2**20


@dataclass(frozen=True)
class RecordedGpu:
    name: str
    uuid: str
    memory_total: int  # bytes, nvmlDeviceGetMemoryInfo().total
    memory_free: int  # bytes; v1 `used` = total - free, which counts the driver's reservation
    compute_capability: tuple[int, int]
    max_pcie_gen: int  # "PCIe Generation / Max": the lower of what the GPU and the host allow
    max_pcie_width: int
    utilization_gpu: int  # percent
    utilization_memory: int  # percent
    temperature_c: int
    power_mw: int
    # None where the dump says N/A: the call raises NVMLError_NotSupported.
    ecc_uncorrected_volatile: int | None
    remapped_rows: tuple[int, int, int, int] | None  # (corrected, uncorrected, pending, failed)
    retired_pages_pending: bool | None
    events_supported: bool = True
    lost: bool = False  # every device call raises NVMLError_GpuIsLost (after an XID 79)


@dataclass(frozen=True)
class RecordedHost:
    driver_version: str
    cuda_driver_version: int  # nvmlSystemGetCudaDriverVersion: 1000 * major + 10 * minor


# Princeton Research Computing, `nvidia-smi -a` on della-j11g1, 2024-02-23: github.com/
# PrincetonUniversity/gpu_programming_intro, 01_what_is_a_gpu/README.md. Compute capability is
# not in that dump; 9.0 is the H100's in NVIDIA's CUDA GPU table.
H100_80GB_HBM3 = RecordedGpu(
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-10f35015-e921-bfab-2eb8-4e9b6664d5f1",
    memory_total=81559 * MIB,  # 85520809984 B, as NVML reports it for H100 80GB HBM3 cards
    memory_free=81227 * MIB,
    compute_capability=(9, 0),
    max_pcie_gen=5,
    max_pcie_width=16,
    utilization_gpu=0,
    utilization_memory=0,
    temperature_c=33,
    power_mw=72_020,
    ecc_uncorrected_volatile=0,  # SRAM + DRAM uncorrectable, volatile
    remapped_rows=(0, 0, 0, 0),
    retired_pages_pending=None,  # "Pending Page Blacklist: N/A": Hopper remaps rows instead
)
DELLA_HOST = RecordedHost(driver_version="545.23.08", cuda_driver_version=12030)

# `nvidia-smi -q` of an RTX 4090 on an i9-9900K host, from a public "Diffusion-Benchmark"
# README on GitHub (footnote [6]). ECC is disabled, so its counters are N/A; the row remapper
# still answers; the host's PCIe 3 caps "Max" at 3 though the card does gen 4.
RTX_4090 = RecordedGpu(
    name="NVIDIA GeForce RTX 4090",
    uuid="GPU-b9029ae5-75ac-6ded-3592-fc695a3f8c1a",
    memory_total=24564 * MIB,
    memory_free=23599 * MIB,
    compute_capability=(8, 9),
    max_pcie_gen=3,
    max_pcie_width=16,
    utilization_gpu=34,
    utilization_memory=5,
    temperature_c=40,
    power_mw=27_980,
    ecc_uncorrected_volatile=None,
    remapped_rows=(0, 0, 0, 0),
    retired_pages_pending=None,
)

# `nvidia-smi -a` of an RTX 5090 (driver 570.124.06, CUDA 12.8, 2025-04-30) kept verbatim in a
# public nvidia-smi simulator script on GitHub. No ECC, no row remapper, no page retirement; its
# link idled at gen 1 x8 while "Max" says gen 5 x16. Compute capability 12.0 is Blackwell's.
RTX_5090 = RecordedGpu(
    name="NVIDIA GeForce RTX 5090",
    uuid="GPU-ea2294a3-4d61-1757-8aed-f91723f16ad2",
    memory_total=32607 * MIB,
    memory_free=32119 * MIB,
    compute_capability=(12, 0),
    max_pcie_gen=5,
    max_pcie_width=16,
    utilization_gpu=0,
    utilization_memory=0,
    temperature_c=25,
    power_mw=24_050,  # "Average Power Draw", what nvmlDeviceGetPowerUsage returns on Blackwell
    ecc_uncorrected_volatile=None,
    remapped_rows=None,
    retired_pages_pending=None,
)
RTX_5090_HOST = RecordedHost(driver_version="570.124.06", cuda_driver_version=12080)


def _raise(code: int) -> Any:
    raise pynvml.NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass


class RecordedEventSet:
    def __init__(self) -> None:
        self.events: queue.Queue[pynvml.c_nvmlEventData_t] = queue.Queue()
        self.registered: set[int] = set()  # GPU indexes
        self.freed = False


class RecordedNvml:
    """The slice of pynvml the daemon uses, over recorded GPUs on one host."""

    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_FEATURE_DISABLED = pynvml.NVML_FEATURE_DISABLED
    NVML_ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Timeout = pynvml.NVMLError_Timeout

    def __init__(self, gpus: Sequence[RecordedGpu], host: RecordedHost = DELLA_HOST) -> None:
        self.gpus = list(gpus)
        self.host = host
        self.initialized = False
        self.event_sets: list[RecordedEventSet] = []
        self._lock = threading.Lock()
        # Opaque device structs that NVML handles point at, one per GPU, kept alive here.
        self._devices = [pynvml.struct_c_nvmlDevice_t() for _ in self.gpus]

    # --- test controls ---------------------------------------------------------------

    def set(self, gpu_uuid: str, **readings: Any) -> None:
        """Changes what one GPU reports from now on, e.g. set(uuid, ecc_uncorrected_volatile=2)."""
        index = self._index_of(gpu_uuid)
        self.gpus[index] = replace(self.gpus[index], **readings)

    def emit_xid(self, gpu_uuid: str | None, xid: int) -> None:
        """Delivers an XID event as the driver would; None: an event with no device attached."""
        index = None if gpu_uuid is None else self._index_of(gpu_uuid)
        data = pynvml.c_nvmlEventData_t(
            eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid
        )
        if index is not None:
            data.device = ctypes.pointer(self._devices[index])
        with self._lock:
            for event_set in self.event_sets:
                if not event_set.freed and (index is None or index in event_set.registered):
                    event_set.events.put(data)

    def _index_of(self, gpu_uuid: str) -> int:
        return next(i for i, g in enumerate(self.gpus) if g.uuid == gpu_uuid)

    # --- pynvml ----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialized = False

    def _check_init(self) -> None:
        if not self.initialized:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.host.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return self.host.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        # A new pointer per call, as pynvml gives; only the address it holds stays the same.
        return ctypes.pointer(self._devices[index])

    def _index(self, handle: Any) -> int:
        self._check_init()
        address = ctypes.cast(handle, ctypes.c_void_p).value
        for index, device in enumerate(self._devices):
            if ctypes.addressof(device) == address:
                if self.gpus[index].lost:
                    _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
                return index
        return _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _gpu(self, handle: Any) -> RecordedGpu:
        return self.gpus[self._index(handle)]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> pynvml.c_nvmlMemory_t:
        gpu = self._gpu(handle)
        used = gpu.memory_total - gpu.memory_free
        return pynvml.c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_free, used=used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return self._gpu(handle).compute_capability

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any) -> int:
        return self._gpu(handle).max_pcie_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any) -> int:
        return self._gpu(handle).max_pcie_width

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> pynvml.c_nvmlUtilization_t:
        gpu = self._gpu(handle)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu(handle).power_mw

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle)
        if gpu.ecc_uncorrected_volatile is None:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if (error_type, counter_type) != (
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        ):
            raise AssertionError("only the uncorrected volatile count was recorded")
        return gpu.ecc_uncorrected_volatile

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        rows = self._gpu(handle).remapped_rows
        return rows if rows is not None else _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        pending = self._gpu(handle).retired_pages_pending
        if pending is None:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.NVML_FEATURE_ENABLED if pending else pynvml.NVML_FEATURE_DISABLED

    # --- events ----------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> RecordedEventSet:
        self._check_init()
        event_set = RecordedEventSet()
        with self._lock:
            self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: Any, event_types: int, event_set: RecordedEventSet
    ) -> None:
        index = self._index(handle)
        if not self.gpus[index].events_supported:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if event_types != pynvml.nvmlEventTypeXidCriticalError:
            raise AssertionError("only XID events were recorded")
        event_set.registered.add(index)

    def nvmlEventSetWait_v2(
        self, event_set: RecordedEventSet, timeout_ms: int
    ) -> pynvml.c_nvmlEventData_t:
        self._check_init()
        if event_set.freed:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        try:
            return event_set.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return _raise(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: RecordedEventSet) -> None:
        self._check_init()
        event_set.freed = True
