"""A container's output: to a log file whole, to NATS in batches, and a tail for the event."""

import asyncio
import codecs
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.messages import LogBatch

MAX_LINE_CHARS = 16 * 1024
MAX_BATCH_CHARS = 256 * 1024


class LogPump:
    """Fed raw chunks from the container's log stream (from a thread, with backpressure),
    it writes them to `log_file` as they came and publishes LogBatch messages of at most
    `batch_lines` lines or `batch_interval_s` of waiting, with increasing `seq`."""

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
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.log_file = log_file
        self._publish = publish
        self.batch_lines = batch_lines
        self.batch_interval_s = batch_interval_s
        self.tail_bytes = tail_bytes
        self._tail: deque[str] = deque(maxlen=tail_lines)
        # Bounded, so a chatty container waits for NATS instead of filling our memory.
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._pending: deque[str] = deque()
        self._pending_chars = 0
        self._seq = 0
        self.lines_total = 0

    async def put(self, chunk: bytes | None) -> None:
        """A chunk of output, or None at the end of the stream."""
        await self._queue.put(chunk)

    def tail(self) -> str:
        text = "\n".join(self._tail)
        encoded = text.encode()
        if len(encoded) > self.tail_bytes:
            text = encoded[-self.tail_bytes :].decode(errors="ignore")
        return text

    def _split(self, text: str, final: bool) -> None:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        elif len(self._partial) > MAX_LINE_CHARS:
            # A line without end (a progress bar) still gets out, in pieces.
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            line = line.removesuffix("\r")
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + " [line truncated]"
            self._tail.append(line)
            self._pending.append(line)
            self._pending_chars += len(line)
            self.lines_total += 1

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

    async def run(self) -> None:
        """Consumes until the end of the stream, then publishes what is left."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        with self.log_file.open("ab") as f:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    chunk = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    chunk = b""
                if chunk is None:
                    self._split(self._decoder.decode(b"", final=True), final=True)
                    f.flush()
                    await self._flush()
                    return
                if chunk:
                    f.write(chunk)
                    self._split(self._decoder.decode(chunk), final=False)
                    if self._pending and deadline is None:
                        deadline = loop.time() + self.batch_interval_s
                due = deadline is not None and loop.time() >= deadline
                if (
                    len(self._pending) >= self.batch_lines
                    or self._pending_chars >= MAX_BATCH_CHARS
                    or due
                ):
                    f.flush()
                    await self._flush()
                    deadline = None
