import asyncio
from pathlib import Path

from common.messages import LogBatch
from provider_daemon.logstream import MAX_LINE_CHARS, LogPump


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
