"""File records and URLs. Functions take the session; the route owns the commit."""

import asyncio
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import Invalid, NotFound
from common.ids import is_uuid
from storage_service.models import File
from storage_service.s3 import ObjectStore
from storage_service.schemas import FileOut, FileUpload


def _safe_filename(filename: str) -> str:
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise Invalid("must be a plain file name without directories", field="filename")
    return filename


async def create_file(
    session: AsyncSession, store: ObjectStore, owner_id: str, filename: str, size: int
) -> FileUpload:
    if size > store.settings.max_file_size:
        raise Invalid(f"must be at most {store.settings.max_file_size} bytes", field="size")
    file_id = str(uuid.uuid4())
    row = File(
        id=file_id,
        owner_id=owner_id,
        filename=_safe_filename(filename),
        size=size,
        object_key=f"{owner_id}/{file_id}",
    )
    session.add(row)
    await session.flush()
    url, expires_at = await asyncio.to_thread(store.presign, "inputs", row.object_key, "PUT")
    return FileUpload(
        file_id=file_id, filename=row.filename, size=size, upload_url=url, expires_at=expires_at
    )


async def get_file(
    session: AsyncSession, store: ObjectStore, file_id: str, owner_id: str | None
) -> FileOut:
    """One file with a download URL; someone else's file is 'not found', never 'forbidden'."""
    row = await session.get(File, file_id) if is_uuid(file_id) else None
    if row is None or (owner_id is not None and row.owner_id != owner_id):
        raise NotFound(f"file {file_id} not found", field="file_id")
    url, expires_at = await asyncio.to_thread(store.presign, "inputs", row.object_key, "GET")
    return FileOut(
        file_id=row.id,
        filename=row.filename,
        size=row.size,
        download_url=url,
        expires_at=expires_at,
    )
