"""Moving bytes to and from object storage through presigned URLs: files read in chunks
(so a 10 GiB input never sits in memory), downloads hashed as they arrive and only put
in place once their size and sha256 match."""

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from gateway.schemas import OutputOut
from gpumarket.client.errors import TransferError

CHUNK = 1 << 20
Progress = Callable[[int], object]  # called with bytes moved since the last call


class FileChunks:
    """A file's bytes, re-readable: a retried PUT sends it again from the start (and
    winds the progress back by what the failed attempt had counted)."""

    def __init__(self, path: Path, progress: Progress | None = None) -> None:
        self.path = path
        self.progress = progress
        self.sent = 0

    def _rewind(self) -> None:
        if self.sent and self.progress:
            self.progress(-self.sent)
        self.sent = 0

    def _count(self, chunk: bytes) -> bytes:
        self.sent += len(chunk)
        if self.progress:
            self.progress(len(chunk))
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        self._rewind()
        with self.path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield self._count(chunk)


class AsyncFileChunks(FileChunks):
    # Not iterable the sync way: httpx would pick that for an AsyncClient's request.
    __iter__ = None  # type: ignore[assignment]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._rewind()
        with self.path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield self._count(chunk)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Upload:
    """What one PUT sends: a file (read in chunks) or bytes, with the sha256 the upload
    URL is then bound to (storage refuses other bytes)."""

    filename: str
    size: int
    sha256: str
    content: bytes | FileChunks

    @classmethod
    def of(
        cls,
        source: Path | bytes,
        filename: str | None,
        progress: Progress | None,
        chunks: type[FileChunks] = FileChunks,
    ) -> "Upload":
        if isinstance(source, Path):
            # Hashed before the upload is registered: one more read of the file.
            size, sha256 = source.stat().st_size, file_sha256(source)
            return cls(filename or source.name, size, sha256, chunks(source, progress))
        return cls(filename or "data", len(source), hashlib.sha256(source).hexdigest(), source)

    def sent(self, response: httpx.Response, progress: Progress | None) -> None:
        """Checks storage's answer; bytes (not read in chunks) count as moved only now."""
        if response.is_error:
            raise refused(f"uploading {self.filename}", response)
        if isinstance(self.content, bytes) and progress:
            progress(self.size)


def refused(what: str, response: httpx.Response) -> TransferError:
    """Storage's refusal, with its own words when it gave them (read the body first)."""
    return TransferError(f"{what}: storage answered {response.status_code}: {response.text[:300]}")


def destination(root: Path, relative: str) -> Path:
    """Where an output named `relative` goes under `root`; never outside it."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise TransferError(f"refusing output path {relative!r}: not a plain relative path")
    return root.joinpath(*parts)


def matches(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` already holds exactly these bytes (a download need not repeat)."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return file_sha256(path) == sha256


class Download:
    """Bytes of one output written beside their destination, checked, then renamed."""

    def __init__(self, dest: Path, size: int, sha256: str, progress: Progress | None) -> None:
        self.dest = dest
        self.size = size
        self.sha256 = sha256
        self.progress = progress
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.partial = dest.with_name(f".{dest.name}.part")
        self.file = self.partial.open("wb")
        self.digest = hashlib.sha256()
        self.written = 0

    @classmethod
    def start(cls, output: OutputOut, root: Path, progress: Progress | None) -> "Download | Path":
        """A download of `output` under `root`, or the file already there with its bytes."""
        dest = destination(root, output.path)
        if matches(dest, output.size, output.sha256):
            if progress:
                progress(output.size)
            return dest
        return cls(dest, output.size, output.sha256, progress)

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.written += len(chunk)
        if self.progress:
            self.progress(len(chunk))

    def finish(self) -> Path:
        self.file.close()
        if self.written != self.size or self.digest.hexdigest() != self.sha256:
            self.partial.unlink(missing_ok=True)
            raise TransferError(
                f"{self.dest.name}: got {self.written} bytes with sha256 "
                f"{self.digest.hexdigest()}, expected {self.size} bytes with {self.sha256}"
            )
        os.replace(self.partial, self.dest)
        return self.dest

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)
