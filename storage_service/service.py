"""File records and URLs. Functions take the session; the route owns the commit."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import Invalid, NotFound
from common.ids import is_uuid
from storage_service import quota
from storage_service.models import File
from storage_service.s3 import ObjectStore
from storage_service.schemas import FileCreate, FileOut, FileUpload


def _safe_filename(filename: str) -> str:
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise Invalid("must be a plain file name without directories", field="filename")
    return filename


async def create_file(session: AsyncSession, store: ObjectStore, body: FileCreate) -> FileUpload:
    """A file record and a URL that takes exactly its bytes (size and sha256), within the
    owner's quota."""
    settings = store.settings
    if body.size > settings.max_file_size:
        raise Invalid(f"must be at most {settings.max_file_size} bytes", field="size")
    filename = _safe_filename(body.filename)
    await quota.check_room(session, settings, body.owner_id, body.size)
    file_id = str(uuid.uuid4())
    row = File(
        id=file_id,
        owner_id=body.owner_id,
        filename=filename,
        size=body.size,
        sha256=body.sha256,
        object_key=f"{body.owner_id}/{file_id}",
    )
    session.add(row)
    await session.flush()
    ttl = timedelta(seconds=settings.url_ttl_s)
    url = await asyncio.to_thread(store.presign_put, "inputs", row.object_key, body.sha256, ttl)
    return FileUpload(
        file_id=file_id,
        filename=row.filename,
        size=row.size,
        sha256=body.sha256,
        upload_url=url,
        expires_at=datetime.now(UTC) + ttl,
    )


async def _owned(session: AsyncSession, file_id: str, owner_id: str | None) -> File:
    """Someone else's file is 'not found', never 'forbidden'."""
    row = await session.get(File, file_id) if is_uuid(file_id) else None
    if row is None or (owner_id is not None and row.owner_id != owner_id):
        raise NotFound(f"file {file_id} not found", field="file_id")
    return row


async def get_file(
    session: AsyncSession, store: ObjectStore, file_id: str, owner_id: str | None
) -> FileOut:
    """One file with a download URL."""
    row = await _owned(session, file_id, owner_id)
    url, expires_at = await asyncio.to_thread(store.presign, "inputs", row.object_key, "GET")
    return FileOut(
        file_id=row.id,
        filename=row.filename,
        size=row.size,
        sha256=row.sha256,
        download_url=url,
        expires_at=expires_at,
    )


async def delete_file(
    session: AsyncSession, store: ObjectStore, file_id: str, owner_id: str | None
) -> None:
    """Deletes the object, then the record (a failure leaves the record to try again)."""
    row = await _owned(session, file_id, owner_id)
    await asyncio.to_thread(store.remove, "inputs", [row.object_key])
    await session.delete(row)
