"""Whether a GPU may take work: its memory error counters and the critical XID errors that NVML
reports, each turned into a reason that tells the owner what is wrong and what fixes it.

All NVML calls go through the `nvml` module the caller passes (pynvml, or a fake in tests).
"""

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Hardware/driver-fault XIDs (not 13/31/43/45), per docs.nvidia.com/deploy/xid-errors catalog.
CRITICAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "memory page retirement or row remapping event",
    64: "memory page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
    154: "driver asks for a GPU reset or reboot",
}

DEFAULT_XID_QUARANTINE_S = 600.0

_RESET = "reset the GPU (nvidia-smi -r) or reboot"


@dataclass(frozen=True)
class MemoryHealth:
    """What the GPU's error counters say; a counter the GPU lacks reads as no problem."""

    # Uncorrected ECC errors since the last driver load or GPU reset; None: no ECC.
    ecc_uncorrected: int | None = None
    remap_pending: bool = False
    remap_failed: bool = False
    pages_pending_retirement: bool = False
    # The driver lost the GPU: every reading fails with "GPU is lost".
    lost: bool = False


class _NeverRaised(Exception):
    pass


def _lost_error(nvml: Any) -> type[BaseException]:
    return getattr(nvml, "NVMLError_GpuIsLost", None) or _NeverRaised


def _optional(nvml: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """One reading, or None where the GPU does not support it; a lost GPU still raises."""
    try:
        return fn(*args)
    except _lost_error(nvml):
        raise
    except Exception:
        return None


def read_memory_health(nvml: Any, handle: Any) -> MemoryHealth:
    try:
        ecc = _optional(
            nvml,
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        # (corrected rows, uncorrected rows, remap pending, remap failed); Ampere and newer.
        rows = _optional(nvml, nvml.nvmlDeviceGetRemappedRows, handle)
        # Page retirement is what GPUs before Ampere have instead of row remapping.
        pages = _optional(nvml, nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
    except _lost_error(nvml):
        return MemoryHealth(lost=True)
    return MemoryHealth(
        ecc_uncorrected=int(ecc) if ecc is not None else None,
        remap_pending=rows is not None and bool(rows[2]),
        remap_failed=rows is not None and bool(rows[3]),
        pages_pending_retirement=pages is not None and pages == nvml.NVML_FEATURE_ENABLED,
    )


def memory_problems(health: MemoryHealth) -> list[str]:
    """Reasons the GPU must not take work now, each with its fix; empty when it may."""
    if health.lost:
        return [
            "the driver lost this GPU (it fell off the bus); reboot, and reseat or replace "
            "the card if it happens again"
        ]
    problems: list[str] = []
    if health.ecc_uncorrected:
        problems.append(
            f"{health.ecc_uncorrected} uncorrectable ECC memory error(s) since the last reset; "
            f"{_RESET}, and replace the card if they come back"
        )
    if health.remap_failed:
        problems.append("GPU memory row remapping failed; the card needs repair or replacement")
    elif health.remap_pending:
        problems.append(f"GPU memory rows are waiting to be remapped; {_RESET} to apply it")
    if health.pages_pending_retirement:
        problems.append(f"GPU memory pages are waiting to be retired; {_RESET} to retire them")
    return problems


def _duration(seconds: float) -> str:
    return f"{round(seconds)} s" if seconds < 120 else f"{round(seconds / 60)} min"


def _handle_key(handle: Any) -> Any:
    # pynvml hands out a new ctypes pointer per call, so compare the addresses they hold.
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


@dataclass(frozen=True)
class _Xid:
    xid: int
    at: float


class XidWatcher:
    """Counts critical XID errors per GPU from NVML's event API on a daemon thread, and holds a
    GPU back from work for `quarantine_s` after its latest one."""

    def __init__(
        self,
        nvml: Any,
        handles: dict[str, Any],
        quarantine_s: float = DEFAULT_XID_QUARANTINE_S,
        clock: Callable[[], float] = time.monotonic,
        wait_ms: int = 200,
    ) -> None:
        self._nvml = nvml
        self._quarantine_s = quarantine_s
        self._clock = clock
        self._wait_ms = wait_ms
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(handles, 0)
        self._latest: dict[str, _Xid] = {}
        self._uuid_by_key = {_handle_key(h): gpu_uuid for gpu_uuid, h in handles.items()}
        self._stop = threading.Event()
        self._event_set = self._open_event_set(handles)
        self._thread: threading.Thread | None = None
        if self._event_set is not None:
            self._thread = threading.Thread(target=self._run, name="nvml-xid-events", daemon=True)
            self._thread.start()

    def _open_event_set(self, handles: dict[str, Any]) -> Any:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.warning("NVML events unavailable (%s): XID errors will not be watched", exc)
            return None
        watched = 0
        for gpu_uuid, handle in handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                watched += 1
            except Exception as exc:
                log.info(
                    "GPU %s reports no XID events (%s); its XID errors go unseen", gpu_uuid, exc
                )
        if watched:
            return event_set
        nvml.nvmlEventSetFree(event_set)
        return None

    def _run(self) -> None:
        nvml = self._nvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        timeout_code = getattr(nvml, "NVML_ERROR_TIMEOUT", 10)
        while not self._stop.is_set():
            try:
                data = wait(self._event_set, self._wait_ms)
            except Exception as exc:
                if getattr(exc, "value", None) != timeout_code:
                    log.warning("waiting for NVML XID events failed: %s", exc)
                    self._stop.wait(1.0)  # don't spin on a persistent failure
                continue
            try:
                self._record(data)
            except Exception:
                log.exception("could not read an NVML XID event")

    def _record(self, data: Any) -> None:
        if int(data.eventType) != self._nvml.nvmlEventTypeXidCriticalError:
            return
        xid = int(data.eventData)
        gpu_uuid = self._uuid_by_key.get(_handle_key(data.device))
        if xid not in CRITICAL_XIDS:
            log.info("XID %d on GPU %s is the program's fault, not the GPU's", xid, gpu_uuid)
            return
        # An event without a known device concerns them all (the Kubernetes device plugin
        # does the same).
        hit = [gpu_uuid] if gpu_uuid is not None else list(self._counts)
        now = self._clock()
        with self._lock:
            for u in hit:
                self._counts[u] += 1
                self._latest[u] = _Xid(xid, now)
        log.warning(
            "critical XID %d (%s) on GPU(s) %s: no new work for %s",
            xid,
            CRITICAL_XIDS[xid],
            ", ".join(hit),
            _duration(self._quarantine_s),
        )

    def count(self, gpu_uuid: str) -> int:
        """Critical XID errors seen on this GPU since the watcher started."""
        with self._lock:
            return self._counts.get(gpu_uuid, 0)

    def problem(self, gpu_uuid: str) -> str | None:
        """Why the GPU is held back (a critical XID within the quarantine), or None."""
        with self._lock:
            latest = self._latest.get(gpu_uuid)
        if latest is None:
            return None
        age = self._clock() - latest.at
        if age >= self._quarantine_s:
            return None
        return (
            f"critical XID {latest.xid} ({CRITICAL_XIDS[latest.xid]}) {_duration(age)} ago; "
            f"no new work for {_duration(self._quarantine_s - age)}, {_RESET} if it repeats"
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stops the thread, then frees the event set it waits on."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._wait_ms / 1000 * 4 + 1)
            if self._thread.is_alive():
                # Freeing the set under a wait still in NVML could crash it; leak it instead.
                log.warning("the NVML XID event thread did not stop; leaving its event set")
                return
        if self._event_set is not None:
            try:
                self._nvml.nvmlEventSetFree(self._event_set)
            except Exception as exc:
                log.warning("freeing the NVML event set failed: %s", exc)
            self._event_set = None
