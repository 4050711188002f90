"""Upload plans for a task's outputs and log (one PUT, or parts for big files), their
completion, and download URLs that say 410 once retention has deleted the objects."""

import asyncio
import math
from datetime import UTC, datetime, timedelta

from minio.error import S3Error
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import Gone, Invalid, NotFound
from storage_service.models import StoredObject
from storage_service.quota import retention_cutoff
from storage_service.s3 import ObjectStore
from storage_service.schemas import (
    CompletedObject,
    CompleteMultipart,
    MultipartPlan,
    MultipartRef,
    PlannedUpload,
    PresignedUrls,
    UploadsPlan,
    UploadsRequest,
)
from storage_service.settings import MAX_PART_SIZE, MAX_PARTS, MAX_URL_TTL_S, MIB, StorageSettings


class Expired(Gone):
    """The objects asked for were deleted by retention; the body says when they expired."""

    def __init__(self, detail: str, expired_at: datetime) -> None:
        super().__init__(detail)
        self.expired_at = expired_at

    def body(self) -> dict:
        return {**super().body(), "expired_at": self.expired_at.isoformat()}


def part_size(settings: StorageSettings, size: int) -> int:
    """The configured part size, or bigger (whole MiB) when the file needs more than
    S3's 10,000 parts."""
    part = settings.part_size
    if size > part * MAX_PARTS:
        part = math.ceil(size / MAX_PARTS / MIB) * MIB
    return part


def _in_parts(settings: StorageSettings, bucket: str, size: int) -> bool:
    # A log is capped by the daemon (256 MiB by default): one PUT (up to 5 GiB) always.
    return bucket == "outputs" and size >= settings.multipart_threshold


def _check_sizes(settings: StorageSettings, body: UploadsRequest) -> None:
    for i, obj in enumerate(body.objects):
        if _in_parts(settings, body.bucket, obj.size):
            too_big = part_size(settings, obj.size) > MAX_PART_SIZE
            limit = MAX_PARTS * MAX_PART_SIZE
        else:
            too_big = obj.size > MAX_PART_SIZE
            limit = MAX_PART_SIZE  # S3's limit for one PUT
        if too_big:
            raise Invalid(f"must be at most {limit} bytes", field=f"objects.{i}.size")


def _url_ttl(settings: StorageSettings, total_bytes: int) -> timedelta:
    """Long enough for every byte of the plan to go up at the slowest rate we plan for."""
    seconds = settings.url_ttl_s + total_bytes / settings.upload_min_bytes_per_s
    return timedelta(seconds=min(seconds, MAX_URL_TTL_S))


async def _record(session: AsyncSession, body: UploadsRequest) -> None:
    """Counts the objects against their owner from now; a repeated plan (a retry) resets
    the record instead of counting twice."""
    if not body.objects:
        return
    rows = [
        {"bucket": body.bucket, "key": o.key, "owner_id": body.owner_id, "size": o.size}
        for o in body.objects
    ]
    stmt = insert(StoredObject).values(rows)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[StoredObject.bucket, StoredObject.key],
            set_={
                "owner_id": stmt.excluded.owner_id,
                "size": stmt.excluded.size,
                "created_at": datetime.now(UTC),
                "deleted_at": None,
            },
        )
    )


def _sign(store: ObjectStore, body: UploadsRequest, ttl: timedelta) -> list[PlannedUpload]:
    settings = store.settings
    planned = []
    for obj in body.objects:
        if not _in_parts(settings, body.bucket, obj.size):
            url = store.presign_put(body.bucket, obj.key, obj.sha256, ttl)
            planned.append(PlannedUpload(key=obj.key, url=url))
            continue
        size = part_size(settings, obj.size)
        upload_id = store.start_multipart(body.bucket, obj.key)
        urls = store.presign_parts(body.bucket, obj.key, upload_id, math.ceil(obj.size / size), ttl)
        multipart = MultipartPlan(upload_id=upload_id, part_size=size, part_urls=urls)
        planned.append(PlannedUpload(key=obj.key, multipart=multipart))
    return planned


async def plan_uploads(
    session: AsyncSession, store: ObjectStore, body: UploadsRequest
) -> UploadsPlan:
    """Records the objects, then signs a PUT per object (bound to its sha256 when given)
    or starts a multipart upload with a URL per part for those at the threshold or over.
    Never refused for quota: a finished job's results are kept, even past it."""
    _check_sizes(store.settings, body)
    await _record(session, body)
    ttl = _url_ttl(store.settings, sum(o.size for o in body.objects))
    planned = await asyncio.to_thread(_sign, store, body, ttl)
    return UploadsPlan(uploads=planned, expires_at=datetime.now(UTC) + ttl)


async def complete_multipart(store: ObjectStore, body: CompleteMultipart) -> CompletedObject:
    numbers = [p.part_number for p in body.parts]
    if numbers != list(range(1, len(numbers) + 1)):
        raise Invalid("must be parts 1..n, each once, in order", field="parts")
    parts = [(p.part_number, p.etag) for p in body.parts]
    try:
        size = await asyncio.to_thread(
            store.complete_multipart, body.bucket, body.key, body.upload_id, parts
        )
    except S3Error as exc:
        if exc.code == "NoSuchUpload":
            # A retry after an answer that got lost: the first call completed it.
            size = await asyncio.to_thread(store.size_of, body.bucket, body.key)
            if size is not None:
                return CompletedObject(key=body.key, size=size)
            raise NotFound(f"upload {body.upload_id} not found", field="upload_id") from None
        if exc.code in ("InvalidPart", "InvalidPartOrder", "EntityTooSmall"):
            raise Invalid(f"storage refused the parts: {exc.message}", field="parts") from None
        raise
    return CompletedObject(key=body.key, size=size)


async def abort_multipart(session: AsyncSession, store: ObjectStore, ref: MultipartRef) -> None:
    """Drops the parts sent so far; the object never existed, so it counts for nobody."""
    await asyncio.to_thread(store.abort_multipart, ref.bucket, ref.key, ref.upload_id)
    await session.execute(
        delete(StoredObject).where(StoredObject.bucket == ref.bucket, StoredObject.key == ref.key)
    )


def _kept_for(settings: StorageSettings) -> str:
    days = settings.retention_s / 86400
    return f"{days:g} days" if days >= 1 else f"{settings.retention_s:g} s"


async def presign_reads(
    session: AsyncSession, store: ObjectStore, bucket: str, keys: list[str], method: str
) -> PresignedUrls:
    """URLs for the keys; 410 with the time they expired when retention deleted any."""
    if bucket != "inputs" and method == "GET":
        await _refuse_expired(session, store.settings, bucket, keys)
    urls, expires_at = await asyncio.to_thread(store.presign_many, bucket, keys, method)
    return PresignedUrls(urls=urls, expires_at=expires_at)


async def _refuse_expired(
    session: AsyncSession, settings: StorageSettings, bucket: str, keys: list[str]
) -> None:
    cutoff = retention_cutoff(settings)
    rows = (
        await session.execute(
            select(StoredObject.created_at, StoredObject.deleted_at).where(
                StoredObject.bucket == bucket,
                StoredObject.key.in_(keys),
                (StoredObject.deleted_at.is_not(None)) | (StoredObject.created_at < cutoff),
            )
        )
    ).all()
    if not rows:
        return
    retention = timedelta(seconds=settings.retention_s)
    expired_at = min(
        min(created + retention, deleted or created + retention) for created, deleted in rows
    )
    what = "this log was" if bucket == "logs" else "these outputs were"
    raise Expired(
        f"{what} deleted: expired at {expired_at.isoformat()}, as "
        f"outputs and logs are kept {_kept_for(settings)} after upload",
        expired_at,
    )
