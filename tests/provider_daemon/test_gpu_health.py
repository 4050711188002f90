import logging
import threading
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest

from provider_daemon.gpu_health import CRITICAL_XIDS, XidWatcher
from provider_daemon.gpus import NvmlGpus
from tests.provider_daemon.recorded_nvml import H100_80GB_HBM3, RTX_4090, RecordedNvml

H100 = H100_80GB_HBM3.uuid
RTX = RTX_4090.uuid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nvml() -> RecordedNvml:
    return RecordedNvml([H100_80GB_HBM3, RTX_4090])


@pytest.fixture
def gpus(nvml: RecordedNvml, clock: Clock) -> Iterator[NvmlGpus]:
    gpus = NvmlGpus(nvml, xid_quarantine_s=600, clock=clock)
    yield gpus
    gpus.close()


def health(gpus: NvmlGpus, gpu_uuid: str) -> tuple[bool, str | None]:
    (m,) = (m for m in gpus.metrics(set()) if m.uuid == gpu_uuid)
    return m.healthy, m.health_reason


class TestMemoryRules:
    def test_uncorrected_ecc_errors_until_a_reset_clears_them(
        self, nvml: RecordedNvml, gpus: NvmlGpus
    ) -> None:
        nvml.set(H100, ecc_uncorrected_volatile=2)
        (h100, rtx) = gpus.metrics(set())
        assert (h100.healthy, h100.ecc_errors) == (False, 2)
        assert h100.health_reason is not None
        assert h100.health_reason.startswith("2 uncorrectable ECC memory error(s)")
        assert "reset the GPU (nvidia-smi -r) or reboot" in h100.health_reason
        assert rtx.healthy
        assert gpus.unhealthy() == {H100: h100.health_reason}

        nvml.set(H100, ecc_uncorrected_volatile=0)  # what a GPU reset does to the count
        assert health(gpus, H100) == (True, None)
        assert gpus.unhealthy() == {}

    def test_pending_row_remap(self, nvml: RecordedNvml, gpus: NvmlGpus) -> None:
        nvml.set(H100, remapped_rows=(1, 0, 1, 0))
        assert health(gpus, H100) == (
            False,
            "GPU memory rows are waiting to be remapped; "
            "reset the GPU (nvidia-smi -r) or reboot to apply it",
        )
        nvml.set(H100, remapped_rows=(1, 0, 0, 0))
        assert health(gpus, H100) == (True, None)

    def test_failed_row_remap_needs_the_card_replaced(
        self, nvml: RecordedNvml, gpus: NvmlGpus
    ) -> None:
        nvml.set(RTX, remapped_rows=(0, 3, 1, 1))
        assert health(gpus, RTX) == (
            False,
            "GPU memory row remapping failed; the card needs repair or replacement",
        )

    def test_pending_page_retirement(self, nvml: RecordedNvml, gpus: NvmlGpus) -> None:
        # Recorded as N/A on both cards (pre-Ampere GPUs have it); NVML says "enabled".
        nvml.set(RTX, retired_pages_pending=True)
        healthy, reason = health(gpus, RTX)
        assert not healthy
        assert reason == (
            "GPU memory pages are waiting to be retired; "
            "reset the GPU (nvidia-smi -r) or reboot to retire them"
        )
        nvml.set(RTX, retired_pages_pending=False)
        assert health(gpus, RTX) == (True, None)

    def test_every_problem_is_named(self, nvml: RecordedNvml, gpus: NvmlGpus) -> None:
        nvml.set(H100, ecc_uncorrected_volatile=1, remapped_rows=(0, 1, 1, 0))
        _, reason = health(gpus, H100)
        assert reason is not None and "ECC" in reason and "remapped" in reason

    def test_a_lost_gpu(self, nvml: RecordedNvml, gpus: NvmlGpus) -> None:
        nvml.set(H100, lost=True)
        h100, rtx = gpus.metrics(set())
        assert (h100.utilization_pct, h100.temperature_c, h100.healthy) == (None, None, False)
        assert h100.health_reason is not None and "fell off the bus" in h100.health_reason
        assert rtx.healthy and rtx.temperature_c == 40.0


class TestXidEvents:
    def test_a_critical_xid_quarantines_that_gpu_only(
        self, nvml: RecordedNvml, gpus: NvmlGpus, clock: Clock
    ) -> None:
        nvml.emit_xid(RTX, 79)
        wait_until(lambda: RTX in gpus.unhealthy())
        assert gpus.unhealthy() == {
            RTX: "critical XID 79 (GPU has fallen off the bus) 0 s ago; no new work for "
            "10 min, reset the GPU (nvidia-smi -r) or reboot if it repeats"
        }
        h100, rtx = gpus.metrics(set())
        assert (h100.healthy, h100.xid_errors) == (True, 0)
        assert (rtx.healthy, rtx.xid_errors) == (False, 1)

        clock.now += 599
        assert RTX in gpus.unhealthy()
        clock.now += 1
        assert gpus.unhealthy() == {}
        _, rtx = gpus.metrics(set())
        # Recovered, but the count since start stays for the owner to see.
        assert (rtx.healthy, rtx.xid_errors) == (True, 1)

    def test_a_new_xid_restarts_the_quarantine(
        self, nvml: RecordedNvml, gpus: NvmlGpus, clock: Clock
    ) -> None:
        nvml.emit_xid(H100, 48)
        wait_until(lambda: H100 in gpus.unhealthy())
        clock.now += 500
        nvml.emit_xid(H100, 95)
        wait_until(lambda: "XID 95" in gpus.unhealthy().get(H100, ""))
        clock.now += 500
        assert "uncontained ECC error" in gpus.unhealthy()[H100]
        assert gpus.metrics(set())[0].xid_errors == 2

    @pytest.mark.parametrize("xid", [13, 31, 43, 45])
    def test_the_programs_own_faults_are_ignored(
        self, nvml: RecordedNvml, gpus: NvmlGpus, xid: int
    ) -> None:
        nvml.emit_xid(H100, xid)
        nvml.emit_xid(RTX, 74)  # events arrive in order: once this one counts, so did the other
        wait_until(lambda: RTX in gpus.unhealthy())
        h100, _ = gpus.metrics(set())
        assert (h100.healthy, h100.xid_errors) == (True, 0)

    def test_an_xid_without_a_device_concerns_every_gpu(
        self, nvml: RecordedNvml, gpus: NvmlGpus
    ) -> None:
        nvml.emit_xid(None, 119)
        wait_until(lambda: set(gpus.unhealthy()) == {H100, RTX})
        assert all("GSP RPC timeout" in r for r in gpus.unhealthy().values())

    def test_a_gpu_without_events_is_skipped(
        self, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        nvml = RecordedNvml([H100_80GB_HBM3, RTX_4090])
        nvml.set(RTX, events_supported=False)
        with caplog.at_level(logging.INFO, logger="provider_daemon.gpu_health"):
            gpus = NvmlGpus(nvml, clock=clock)
        try:
            assert f"GPU {RTX} reports no XID events" in caplog.text
            nvml.emit_xid(H100, 79)
            wait_until(lambda: H100 in gpus.unhealthy())
            assert gpus.metrics(set())[1].healthy
        finally:
            gpus.close()

    def test_no_gpu_with_events_means_no_watcher(self, clock: Clock) -> None:
        nvml = RecordedNvml([RTX_4090])
        nvml.set(RTX, events_supported=False)
        gpus = NvmlGpus(nvml, clock=clock)
        try:
            assert [s.freed for s in nvml.event_sets] == [True]
            assert gpus.metrics(set())[0].healthy
        finally:
            gpus.close()

    def test_the_older_wait_call_is_used_when_v2_is_missing(self, clock: Clock) -> None:
        class OlderNvml(RecordedNvml):
            nvmlEventSetWait_v2 = None

            def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> object:
                return RecordedNvml.nvmlEventSetWait_v2(self, event_set, timeout_ms)

        nvml = OlderNvml([RTX_4090])
        gpus = NvmlGpus(nvml, clock=clock)
        try:
            nvml.emit_xid(RTX, 62)
            wait_until(lambda: RTX in gpus.unhealthy())
        finally:
            gpus.close()

    def test_close_stops_the_thread_then_frees_the_event_set(self, nvml: RecordedNvml) -> None:
        before = {t.ident for t in threading.enumerate()}
        gpus = NvmlGpus(nvml)
        watchers = [t for t in threading.enumerate() if t.ident not in before]
        assert [t.name for t in watchers] == ["nvml-xid-events"]
        assert watchers[0].daemon
        gpus.close()
        assert not watchers[0].is_alive()
        assert [s.freed for s in nvml.event_sets] == [True]
        assert not nvml.initialized

    def test_a_failing_wait_is_retried(self, nvml: RecordedNvml, clock: Clock) -> None:
        calls = 0
        original = nvml.nvmlEventSetWait_v2

        def flaky(event_set: object, timeout_ms: int) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise pynvml.NVMLError_Unknown()
            return original(event_set, timeout_ms)

        nvml.nvmlEventSetWait_v2 = flaky
        watcher = XidWatcher(nvml_started(nvml), handles(nvml), clock=clock)
        try:
            nvml.emit_xid(H100, 64)
            wait_until(lambda: watcher.problem(H100) is not None)
        finally:
            watcher.close()
        assert not watcher.running


def nvml_started(nvml: RecordedNvml) -> RecordedNvml:
    nvml.nvmlInit()
    return nvml


def handles(nvml: RecordedNvml) -> dict[str, object]:
    return {g.uuid: nvml.nvmlDeviceGetHandleByIndex(i) for i, g in enumerate(nvml.gpus)}


def test_the_critical_set_leaves_out_program_faults() -> None:
    assert {13, 31, 43, 45}.isdisjoint(CRITICAL_XIDS)
    assert {48, 63, 64, 74, 79, 92, 94, 95}.issubset(CRITICAL_XIDS)
