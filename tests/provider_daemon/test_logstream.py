import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from common.messages import LogBatch
from provider_daemon.logstream import MAX_LINE_CHARS, LogLimits, LogPump
from tests.provider_daemon.conftest import until


def make_pump(tmp_path: Path, published: list[LogBatch], **kwargs: object) -> LogPump:
    async def publish(batch: LogBatch) -> None:
        published.append(batch)

    return LogPump("job-1", 1, tmp_path / "job.log", publish, **kwargs)  # type: ignore[arg-type]


class TestLogPump:
    async def test_lines_split_across_chunks_and_batched(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        pump = make_pump(tmp_path, published, batch_lines=3)
        running = asyncio.create_task(pump.run())
        for chunk in [b"one\ntw", b"o\r\nthree\nfour\n", "caf\u00e9".encode()[:-1], b"\xa9 end"]:
            await pump.put(chunk)
        await pump.put(None)
        await running
        lines = [line for b in published for line in b.lines]
        assert lines == ["one", "two", "three", "four", "caf\u00e9 end"]
        assert [b.seq for b in published] == list(range(len(published)))
        assert all(len(b.lines) <= 3 for b in published)
        assert (
            tmp_path / "job.log"
        ).read_bytes() == "one\ntwo\r\nthree\nfour\ncaf\u00e9 end".encode()

    async def test_a_slow_trickle_is_sent_within_the_interval(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        pump = make_pump(tmp_path, published, batch_interval_s=0.05)
        running = asyncio.create_task(pump.run())
        await pump.put(b"first\n")
        await asyncio.sleep(0.3)
        assert [b.lines for b in published] == [["first"]]
        await pump.put(None)
        await running

    async def test_tail_is_bounded(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        pump = make_pump(tmp_path, published, tail_lines=50, tail_bytes=8192)
        running = asyncio.create_task(pump.run())
        await pump.put(b"".join(b"line %d\n" % i for i in range(500)))
        await pump.put(b"x" * (MAX_LINE_CHARS * 2) + b"\n")
        await pump.put(None)
        await running
        tail = pump.tail()
        assert len(tail.encode()) <= 8192
        assert tail.endswith("[line truncated]")
        assert pump.lines_total == 501


class Clock:
    """The pump's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def numbered(first: int, last: int) -> bytes:
    return b"".join(b"line-%05d\n" % i for i in range(first, last))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def live(published: list[LogBatch]) -> list[str]:
    return [line for b in sorted(published, key=lambda b: b.seq) for line in b.lines]


async def fed(pump: LogPump, lines: int) -> None:
    """Waits until the pump has split `lines` lines (chunks are handled as they are taken)."""
    await until(lambda: pump.lines_total >= lines, 10, f"{lines} lines handled")


# Limits that never get in the way, for tests of one limit at a time.
LOOSE = LogLimits(live_lines_per_s=1e9, live_burst_lines=10**9, live_bytes_per_s=1e12)


class TestLogLimits:
    async def test_lines_over_the_rate_are_stored_and_announced_once_per_run(
        self, tmp_path: Path
    ) -> None:
        published: list[LogBatch] = []
        clock = Clock()
        limits = replace(LOOSE, live_lines_per_s=10, live_burst_lines=20)
        pump = make_pump(tmp_path, published, limits=limits, clock=clock)
        running = asyncio.create_task(pump.run())
        before = {
            reason: sample(
                "provider_daemon_log_lines_dropped_total", destination="live", reason=reason
            )
            for reason in ("rate_limit", "cap")
        }
        live_before = sample("provider_daemon_log_lines_total", destination="live")
        # One line per chunk, as the engines send them: still one marker for the run.
        for i in range(100):
            await pump.put(numbered(i, i + 1))
        await fed(pump, 100)
        clock.now += 0.5  # 5 lines' worth back: not yet a second's worth
        await pump.put(b"still too early\n")
        await fed(pump, 101)
        clock.now += 0.5
        await pump.put(b"back live\n")
        await pump.put(None)
        await running

        assert live(published) == [
            *(f"line-{i:05d}" for i in range(20)),
            "[gpumarket: 81 lines not streamed live (rate limit); the stored log has them]",
            "back live",
        ]
        stored = (tmp_path / "job.log").read_bytes()
        assert stored == numbered(0, 100) + b"still too early\nback live\n"
        dropped = sample(
            "provider_daemon_log_lines_dropped_total", destination="live", reason="rate_limit"
        )
        assert dropped - before["rate_limit"] == 81
        assert (
            sample("provider_daemon_log_lines_dropped_total", destination="live", reason="cap")
            == (before["cap"])
        )
        assert sample("provider_daemon_log_lines_total", destination="live") - live_before == 21

    async def test_the_byte_rate_limits_long_lines(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        limits = replace(LOOSE, live_bytes_per_s=100, live_burst_bytes=100)
        pump = make_pump(tmp_path, published, limits=limits, clock=Clock())
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(0, 50))  # 10 bytes a line live (no newline there)
        await pump.put(None)
        await running
        assert live(published) == [
            *(f"line-{i:05d}" for i in range(10)),
            "[gpumarket: 40 lines not streamed live (rate limit); the stored log has them]",
        ]

    async def test_a_skipped_run_is_announced_when_the_output_goes_quiet(
        self, tmp_path: Path
    ) -> None:
        published: list[LogBatch] = []
        # A second's worth (capped at the burst, 5 lines) is back within 0.05 s.
        limits = replace(LOOSE, live_lines_per_s=100, live_burst_lines=5)
        pump = make_pump(tmp_path, published, limits=limits, batch_interval_s=0.01)
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(0, 30))
        marker = "[gpumarket: 25 lines not streamed live (rate limit); the stored log has them]"
        await until(lambda: marker in live(published), 5, "the marker without a new line")
        await pump.put(None)
        await running
        assert live(published) == [*(f"line-{i:05d}" for i in range(5)), marker]

    async def test_past_the_live_cap_one_marker_then_nothing(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        clock = Clock()
        limits = replace(LOOSE, live_max_lines=30)
        pump = make_pump(tmp_path, published, limits=limits, clock=clock, batch_lines=7)
        running = asyncio.create_task(pump.run())
        caps_before = sample("provider_daemon_log_caps_reached_total", destination="live")
        dropped_before = sample(
            "provider_daemon_log_lines_dropped_total", destination="live", reason="cap"
        )
        await pump.put(numbered(0, 25))
        await pump.put(numbered(25, 40))
        await fed(pump, 40)
        clock.now += 3600  # no budget ever reopens the live stream
        for i in range(40, 100):
            await pump.put(numbered(i, i + 1))
        await pump.put(None)
        await running
        cap_marker = (
            "[gpumarket: live log stopped at its cap of 30 lines per job; "
            "the stored log has the rest]"
        )
        assert live(published) == [*(f"line-{i:05d}" for i in range(30)), cap_marker]
        assert (tmp_path / "job.log").read_bytes() == numbered(0, 100)
        assert pump.tail().splitlines()[-1] == "line-00099"
        assert sample("provider_daemon_log_caps_reached_total", destination="live") == (
            caps_before + 1
        )
        dropped = sample(
            "provider_daemon_log_lines_dropped_total", destination="live", reason="cap"
        )
        assert dropped - dropped_before == 70

    async def test_the_live_cap_in_bytes(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        limits = replace(LOOSE, live_max_bytes=2 * 1024)
        pump = make_pump(tmp_path, published, limits=limits)
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(0, 1000))
        await pump.put(None)
        await running
        lines = live(published)
        assert lines[:-1] == [f"line-{i:05d}" for i in range(204)]
        assert lines[-1] == (
            "[gpumarket: live log stopped at its cap of 2 KiB per job; the stored log has the rest]"
        )

    async def test_past_the_file_cap_one_marker_and_the_pump_goes_on(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        limits = replace(LOOSE, file_max_bytes=1000)
        pump = make_pump(tmp_path, published, limits=limits)
        running = asyncio.create_task(pump.run())
        file_before = sample("provider_daemon_log_bytes_total", destination="file")
        dropped_before = sample(
            "provider_daemon_log_lines_dropped_total", destination="file", reason="cap"
        )
        for first in range(0, 300, 7):  # 77-byte chunks: the cap falls inside one
            await pump.put(numbered(first, min(first + 7, 300)))
        await pump.put(None)
        await running
        marker = b"[gpumarket: the stored log stops here, at its cap of 1000 bytes per job]\n"
        # Whole lines (11 bytes each) up to the cap, then the marker.
        assert (tmp_path / "job.log").read_bytes() == numbered(0, 90) + marker
        # Everything was still read: the live stream and the tail have it all.
        assert pump.lines_total == 300
        assert live(published) == [f"line-{i:05d}" for i in range(300)]
        assert pump.tail().splitlines()[-1] == "line-00299"
        assert sample("provider_daemon_log_bytes_total", destination="file") - file_before == 990
        dropped = sample(
            "provider_daemon_log_lines_dropped_total", destination="file", reason="cap"
        )
        assert dropped - dropped_before == 210

    async def test_the_file_cap_inside_a_line(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        pump = make_pump(tmp_path, published, limits=replace(LOOSE, file_max_bytes=50))
        running = asyncio.create_task(pump.run())
        await pump.put(b"first\n" + b"x" * 30)
        await pump.put(b"x" * 70 + b"\nlast\n")
        await pump.put(None)
        await running
        # The line begun before the cap stays as it was cut, ended by a newline.
        marker = b"[gpumarket: the stored log stops here, at its cap of 50 bytes per job]\n"
        assert (tmp_path / "job.log").read_bytes() == b"first\n" + b"x" * 30 + b"\n" + marker
        assert pump.tail() == "first\n" + "x" * 100 + "\nlast"

    async def test_a_restarted_daemon_counts_the_log_file_it_appends_to(
        self, tmp_path: Path
    ) -> None:
        limits = replace(LOOSE, file_max_bytes=100)
        marker = b"[gpumarket: the stored log stops here, at its cap of 100 bytes per job]\n"
        (tmp_path / "job.log").write_bytes(numbered(0, 5))
        pump = make_pump(tmp_path, [], limits=limits)
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(5, 20))
        await pump.put(None)
        await running
        assert (tmp_path / "job.log").read_bytes() == numbered(0, 9) + marker
        # Once more: the file already stops at its cap, and stays so.
        pump = make_pump(tmp_path, [], limits=limits)
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(20, 30))
        await pump.put(None)
        await running
        assert (tmp_path / "job.log").read_bytes() == numbered(0, 9) + marker
        assert pump.tail().splitlines()[-1] == "line-00029"

    async def test_markers_say_when_the_stored_log_is_full_too(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        limits = replace(LOOSE, live_lines_per_s=1, live_burst_lines=3, file_max_bytes=100)
        pump = make_pump(tmp_path, published, limits=limits, clock=Clock())
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(0, 50))
        await pump.put(None)
        await running
        assert live(published)[-1] == (
            "[gpumarket: 47 lines not streamed live (rate limit); the stored log is full too]"
        )

    async def test_the_tail_is_the_last_lines_whatever_was_capped(self, tmp_path: Path) -> None:
        published: list[LogBatch] = []
        limits = LogLimits(
            live_lines_per_s=1,
            live_burst_lines=1,
            live_bytes_per_s=10,
            live_burst_bytes=10,
            live_max_lines=1,
            live_max_bytes=10,
            file_max_bytes=10,
        )
        pump = make_pump(tmp_path, published, limits=limits, tail_lines=50)
        running = asyncio.create_task(pump.run())
        await pump.put(numbered(0, 10_000) + b"line-1")  # a chunk of many lines
        await pump.put(b"0000\r\n")
        for i in range(10_001, 10_020):  # then a line a chunk
            await pump.put(numbered(i, i + 1))
        await pump.put(b"no newline at the end")
        await pump.put(None)
        await running
        expected = [f"line-{i:05d}" for i in range(9_971, 10_020)] + ["no newline at the end"]
        assert pump.tail().split("\n") == expected
        assert pump.lines_total == 10_021

    def test_limits_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="live_max_lines must be positive"):
            LogLimits(live_max_lines=0)
