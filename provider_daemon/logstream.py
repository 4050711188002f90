"""A container's output: to a log file (up to a cap), live to NATS in batches (rate limited,
up to a cap per job), and a tail for the finished event.

A job that prints forever costs little: lines that don't go live are never handled one by
one in Python (str.count and rsplit find how many there are and the tail), and past the caps
nothing is kept but the tail.
"""

import asyncio
import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

from common.messages import LogBatch
from common.sizes import binary_size
from provider_daemon import metrics

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 16 * 1024
MAX_BATCH_CHARS = 256 * 1024
KIB = 1024
MIB = 1024 * KIB
# Chunks handled in a row before the pump lets the rest of the daemon run.
CHUNKS_PER_TURN = 64
# Output chunks read but not yet consumed, at most.
QUEUE_CHUNKS = 256
METRICS_EVERY_S = 1.0
FILE_CAP_MARKER = "[gpumarket: the stored log stops here, at its cap of {cap} per job]\n"


@dataclass(frozen=True)
class LogLimits:
    """How much of one job attempt's output goes live to NATS, and into its stored log."""

    # The live stream: a token bucket of lines and one of bytes, both starting full.
    live_lines_per_s: float = 1_000.0
    live_burst_lines: int = 5_000
    live_bytes_per_s: float = 1 * MIB
    live_burst_bytes: int = 4 * MIB
    # What one attempt may send live in all; past it the stored log is the only copy.
    live_max_lines: int = 100_000
    live_max_bytes: int = 64 * MIB
    # The stored log, uploaded when the job ends.
    file_max_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"log limit {f.name} must be positive, not {value}")


def _clean(line: str) -> str:
    line = line.removesuffix("\r")
    if len(line) > MAX_LINE_CHARS:
        line = line[:MAX_LINE_CHARS] + " [line truncated]"
    return line


def _utf8_len(line: str) -> int:
    # isascii() is O(1) in CPython: the common case costs no encoding.
    return len(line) if line.isascii() else len(line.encode(errors="replace"))


def _stored(file_full: bool) -> str:
    return "the stored log is full too" if file_full else "the stored log has them"


class _Bucket:
    """A token bucket: fills at `rate` a second up to `size`; starts full."""

    __slots__ = ("_at", "level", "rate", "size")

    def __init__(self, rate: float, size: float, now: float) -> None:
        self.rate, self.size, self.level, self._at = rate, size, size, now

    def refill(self, now: float) -> None:
        self.level = min(self.size, self.level + (now - self._at) * self.rate)
        self._at = now

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)


class _LiveGate:
    """Which lines go live: those within the rate until the attempt's cap. A run of lines
    over the rate is skipped whole and announced by one marker line when the stream resumes,
    which is once a second's worth of budget is back (so at most about one marker a second)."""

    def __init__(self, limits: LogLimits, now: float) -> None:
        self.limits = limits
        self._lines = _Bucket(limits.live_lines_per_s, limits.live_burst_lines, now)
        self._bytes = _Bucket(limits.live_bytes_per_s, limits.live_burst_bytes, now)
        self._resume_lines = min(limits.live_burst_lines, limits.live_lines_per_s)
        self._resume_bytes = min(limits.live_burst_bytes, limits.live_bytes_per_s)
        self.skipping = False
        self.skipped = 0  # in the current run
        self.closed = False
        # Totals, for the metrics and the daemon's own log.
        self.sent_lines = 0
        self.sent_bytes = 0
        self.skipped_total = 0
        self.dropped_total = 0  # past the cap

    def admit(
        self, block: str, count: int, lines: list[str] | None, now: float, file_full: bool
    ) -> list[str]:
        """What goes live of `count` lines (`block`, joined by newlines; `lines`, the same
        cleaned, when the caller has them): lines and markers, in order."""
        if self.closed:
            self.dropped_total += count
            return []
        self._lines.refill(now)
        self._bytes.refill(now)
        out: list[str] = []
        if self.skipping:
            if not self._may_resume():
                self.skipped += count
                self.skipped_total += count
                return out
            out.append(self._end_skip(file_full))
        limits = self.limits
        room = min(count, int(self._lines.level), limits.live_max_lines - self.sent_lines)
        taken = 0
        capped = False
        if room > 0:
            if lines is None or room < count:
                head = [_clean(x) for x in block.split("\n", room)[:room]]
            else:
                head = lines
            for line in head:
                size = _utf8_len(line)
                if self.sent_bytes + size > limits.live_max_bytes:
                    capped = True
                    break
                # A line bigger than the whole bucket passes when the bucket is full.
                cost = min(size, self._bytes.size)
                if cost > self._bytes.level:
                    break
                self._bytes.level -= cost
                self.sent_bytes += size
                out.append(line)
                taken += 1
            self._lines.level -= taken
            self.sent_lines += taken
        left = count - taken
        if left:
            if capped or self.sent_lines >= limits.live_max_lines:
                out.append(self._close(file_full))
                self.dropped_total += left
            else:
                self.skipping = True
                self.skipped += left
                self.skipped_total += left
        return out

    def _may_resume(self) -> bool:
        return self._lines.level >= self._resume_lines and self._bytes.level >= self._resume_bytes

    def seconds_to_resume(self) -> float | None:
        if not self.skipping:
            return None
        return max(
            self._lines.seconds_until(self._resume_lines),
            self._bytes.seconds_until(self._resume_bytes),
        )

    def tick(self, now: float, file_full: bool) -> list[str]:
        """Ends a skipped run once the budget is back, though no new line came."""
        if not self.skipping:
            return []
        self._lines.refill(now)
        self._bytes.refill(now)
        return [self._end_skip(file_full)] if self._may_resume() else []

    def finish(self, file_full: bool) -> list[str]:
        """At the end of the output: a skipped run still open gets its marker now."""
        return [self._end_skip(file_full)] if self.skipping else []

    def _end_skip(self, file_full: bool) -> str:
        marker = (
            f"[gpumarket: {self.skipped:,} lines not streamed live (rate limit); "
            f"{_stored(file_full)}]"
        )
        self.skipping, self.skipped = False, 0
        return marker

    def _close(self, file_full: bool) -> str:
        self.closed = True
        limits = self.limits
        if self.sent_lines >= limits.live_max_lines:
            cap = f"{limits.live_max_lines:,} lines"
        else:
            cap = binary_size(limits.live_max_bytes)
        rest = "the stored log is full too" if file_full else "the stored log has the rest"
        return f"[gpumarket: live log stopped at its cap of {cap} per job; {rest}]"


class LogPump:
    """Fed raw chunks from the container's log stream (from a thread, with backpressure),
    it writes them to `log_file` as they came (up to `limits.file_max_bytes`) and publishes
    LogBatch messages of at most `batch_lines` lines or `batch_interval_s` of waiting, with
    increasing `seq`, within `limits`' rate and cap. The tail is always the output's last
    lines, whatever was capped."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        log_file: Path,
        publish: Callable[[LogBatch], Awaitable[object]],
        batch_lines: int = 100,
        batch_interval_s: float = 0.2,
        tail_lines: int = 50,
        tail_bytes: int = 8 * 1024,
        limits: LogLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_seq: int = 0,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.log_file = log_file
        self._publish = publish
        self.batch_lines = batch_lines
        self.batch_interval_s = batch_interval_s
        self.tail_bytes = tail_bytes
        self.limits = limits or LogLimits()
        self._clock = clock
        self._tail: deque[str] = deque(maxlen=tail_lines)
        # Bounded by `_room`, so a chatty container waits for us instead of filling our
        # memory; a threading semaphore, so the log thread can wait for room without a
        # round trip through the event loop per chunk.
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._room = threading.Semaphore(QUEUE_CHUNKS)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._pending: deque[str] = deque()
        self._pending_chars = 0
        self._seq = first_seq
        self._gate = _LiveGate(self.limits, clock())
        self._file_full = False
        self._file_ends_line = True
        self.lines_total = 0
        self.file_bytes = 0
        self.file_lines = 0
        self.file_dropped_lines = 0
        self._reported: dict[tuple[str, ...], int] = {}
        self._extra = {"job_id": job_id, "attempt": attempt}

    async def put(self, chunk: bytes | None) -> None:
        """A chunk of output, or None at the end of the stream."""
        if not self._room.acquire(blocking=False):
            await asyncio.to_thread(self._room.acquire)
        self._queue.put_nowait(chunk)

    def put_from_thread(
        self, chunk: bytes | None, loop: asyncio.AbstractEventLoop, timeout_s: float
    ) -> bool:
        """put() for the log-reading thread: waits up to `timeout_s` for room, then hands
        the chunk to the loop without waiting for it; False if it could not."""
        if not self._room.acquire(timeout=timeout_s):
            return False
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the loop is closed
            self._room.release()
            return False
        return True

    def tail(self) -> str:
        text = "\n".join(self._tail)
        encoded = text.encode()
        if len(encoded) > self.tail_bytes:
            text = encoded[-self.tail_bytes :].decode(errors="ignore")
        return text

    # --- the stored log ----------------------------------------------------------------

    def _write(self, f: BinaryIO, chunk: bytes) -> None:
        """To the stored log, up to its cap; there one marker line, and nothing after."""
        if self._file_full:
            self.file_dropped_lines += chunk.count(b"\n")
            return
        room = self.limits.file_max_bytes - self.file_bytes
        if len(chunk) <= room:
            f.write(chunk)
            self.file_bytes += len(chunk)
            self.file_lines += chunk.count(b"\n")
            self._file_ends_line = chunk.endswith(b"\n")
            return
        # Whole lines only: the stored log ends with the last line that fits.
        part = chunk[: chunk.rfind(b"\n", 0, room) + 1]
        f.write(part)
        self.file_bytes += len(part)
        self.file_lines += part.count(b"\n")
        self.file_dropped_lines += chunk.count(b"\n") - part.count(b"\n")
        ends_line = part.endswith(b"\n") if part else self._file_ends_line
        cap = binary_size(self.limits.file_max_bytes)
        marker = FILE_CAP_MARKER.format(cap=cap).encode()
        f.write((b"" if ends_line else b"\n") + marker)
        self._file_full = True
        log.warning("job output reached the stored log's cap of %s", cap, extra=self._extra)

    def _continue_file(self, size: int) -> None:
        """A daemon that restarted appends to the log file of the attempt it follows: the
        cap counts what is there, and a file that reached it stays as it was."""
        if not size:
            return
        with self.log_file.open("rb") as f:
            f.seek(max(0, size - 512))
            end = f.read()
        self.file_bytes = size
        self._file_ends_line = end.endswith(b"\n")
        last_line = end.removesuffix(b"\n").rpartition(b"\n")[2]
        stopped = FILE_CAP_MARKER.partition("{")[0].encode()
        self._file_full = size >= self.limits.file_max_bytes or last_line.startswith(stopped)
        # The earlier run counted these in its metrics.
        self._reported[("bytes", "file")] = size
        self._reported[("caps", "file")] = int(self._file_full)

    # --- lines -------------------------------------------------------------------------

    def _feed(self, text: str, final: bool) -> None:
        data = self._partial + text if self._partial else text
        end = data.rfind("\n")
        if end < 0:
            self._partial = data
        else:
            self._partial = data[end + 1 :]
            self._lines(data[:end], data.count("\n", 0, end) + 1)
        if (final and self._partial) or len(self._partial) > MAX_LINE_CHARS:
            # A line without end (a progress bar) still gets out, in pieces.
            rest, self._partial = self._partial, ""
            self._lines(rest, 1)

    def _lines(self, block: str, count: int) -> None:
        """`count` whole lines, joined by newlines in `block`."""
        self.lines_total += count
        keep = self._tail.maxlen or 0
        lines: list[str] | None = None
        if count <= keep:
            lines = [_clean(x) for x in block.split("\n")]
            self._tail.extend(lines)
        elif keep:
            # Only the last lines are split out: a flood is never split line by line.
            self._tail.extend(_clean(x) for x in block.rsplit("\n", keep)[1:])
        closed = self._gate.closed
        self._go_live(self._gate.admit(block, count, lines, self._clock(), self._file_full))
        if self._gate.closed and not closed:
            log.warning("job output reached the live log's cap", extra=self._extra)

    def _go_live(self, lines: list[str]) -> None:
        if lines:
            self._pending.extend(lines)
            self._pending_chars += sum(map(len, lines))

    async def _flush(self) -> None:
        while self._pending:
            batch: list[str] = []
            size = 0
            while self._pending and len(batch) < self.batch_lines and size < MAX_BATCH_CHARS:
                line = self._pending.popleft()
                batch.append(line)
                size += len(line)
            self._pending_chars -= size
            await self._publish(
                LogBatch(job_id=self.job_id, attempt=self.attempt, seq=self._seq, lines=batch)
            )
            self._seq += 1

    # --- metrics -----------------------------------------------------------------------

    def _sync_metrics(self) -> None:
        """Adds what changed since the last call to the daemon's counters (batched: a flood
        must not cost a counter update per line)."""
        gate = self._gate
        now: dict[tuple[str, ...], int] = {
            ("lines", "live"): gate.sent_lines,
            ("lines", "file"): self.file_lines,
            ("bytes", "live"): gate.sent_bytes,
            ("bytes", "file"): self.file_bytes,
            ("dropped", "live", "rate_limit"): gate.skipped_total,
            ("dropped", "live", "cap"): gate.dropped_total,
            ("dropped", "file", "cap"): self.file_dropped_lines,
            ("caps", "live"): int(gate.closed),
            ("caps", "file"): int(self._file_full),
        }
        for key, value in now.items():
            delta = value - self._reported.get(key, 0)
            if delta <= 0:
                continue
            self._reported[key] = value
            kind, *labels = key
            counter = {
                "lines": metrics.LOG_LINES,
                "bytes": metrics.LOG_BYTES,
                "dropped": metrics.LOG_LINES_DROPPED,
                "caps": metrics.LOG_CAPS_REACHED,
            }[kind]
            counter.labels(*labels).inc(delta)

    # --- the loop ----------------------------------------------------------------------

    async def _next(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> bytes | None:
        """The next chunk; b"" when the batch is due or a skipped run may end first."""
        waits = [] if deadline is None else [deadline - loop.time()]
        resume = self._gate.seconds_to_resume()
        if resume is not None:
            waits.append(resume)
        timeout = max(0.0, min(waits)) if waits else None
        try:
            chunk = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return b""
        self._room.release()
        return chunk

    async def run(self) -> None:
        """Consumes until the end of the stream, then publishes what is left."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        metrics_at = loop.time() + METRICS_EVERY_S
        in_a_row = 0
        with self.log_file.open("ab") as f:
            self._continue_file(f.tell())
            try:
                while True:
                    # Straight from the queue while it has chunks: asyncio.wait_for costs
                    # a task per call, too much for a line per chunk.
                    try:
                        chunk = self._queue.get_nowait()
                        self._room.release()
                    except asyncio.QueueEmpty:
                        in_a_row = 0
                        chunk = await self._next(loop, deadline)
                    if chunk is None:
                        self._feed(self._decoder.decode(b"", final=True), final=True)
                        self._go_live(self._gate.finish(self._file_full))
                        f.flush()
                        await self._flush()
                        return
                    if chunk:
                        self._write(f, chunk)
                        self._feed(self._decoder.decode(chunk), final=False)
                    else:
                        self._go_live(self._gate.tick(self._clock(), self._file_full))
                    now = loop.time()
                    if self._pending and deadline is None:
                        deadline = now + self.batch_interval_s
                    if (
                        len(self._pending) >= self.batch_lines
                        or self._pending_chars >= MAX_BATCH_CHARS
                        or (deadline is not None and now >= deadline)
                    ):
                        f.flush()
                        await self._flush()
                        deadline = None
                    if now >= metrics_at:
                        metrics_at = now + METRICS_EVERY_S
                        self._sync_metrics()
                    in_a_row += 1
                    if in_a_row >= CHUNKS_PER_TURN:
                        in_a_row = 0
                        await asyncio.sleep(0)
            finally:
                self._sync_metrics()
