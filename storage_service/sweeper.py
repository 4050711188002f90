"""Retention: deletes inputs, outputs and logs older than retention_s. S3 lifecycle rules
do it too where the server has them, but only in whole days and not everywhere; this
sweep is the guarantee."""

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from storage_service.models import File, StoredObject
from storage_service.quota import retention_cutoff
from storage_service.s3 import BUCKET_KINDS, ObjectStore

log = logging.getLogger(__name__)

DELETED = Counter(
    "storage_retention_deleted_total", "Objects deleted for retention, by bucket", ["bucket"]
)
SWEEPS = Counter("storage_retention_sweeps_total", "Retention sweeps, by result", ["result"])

FILE_BATCH = 1000
# No part URL outlives 7 days, so an upload unfinished after that never will be.
ABANDONED_AFTER = timedelta(days=7)


@dataclass
class Swept:
    files: int = 0
    objects: dict[str, int] = field(default_factory=dict)
    uploads_aborted: int = 0


async def _expired_files(db: async_sessionmaker, store: ObjectStore, cutoff: datetime) -> int:
    """Input files past retention: the objects go first, then their rows, a batch at a time
    (a crash in between leaves rows whose objects are gone; the next pass deletes them)."""
    total = 0
    while True:
        async with db() as session:
            rows = (
                await session.execute(
                    select(File.id, File.object_key)
                    .where(File.created_at < cutoff)
                    .order_by(File.created_at)
                    .limit(FILE_BATCH)
                )
            ).all()
        if not rows:
            return total
        await asyncio.to_thread(store.remove, "inputs", [key for _, key in rows])
        async with db.begin() as session:
            await session.execute(delete(File).where(File.id.in_([i for i, _ in rows])))
        total += len(rows)


async def sweep(db: async_sessionmaker, store: ObjectStore, now: datetime | None = None) -> Swept:
    """One pass. Safe to run in several replicas at once: every step is idempotent."""
    now = now or datetime.now(UTC)
    cutoff = retention_cutoff(store.settings, now)
    swept = Swept(files=await _expired_files(db, store, cutoff))
    # By last-modified time: also catches objects that have no record (a lost upload).
    for kind in BUCKET_KINDS:
        count = await asyncio.to_thread(store.remove_modified_before, kind, cutoff)
        swept.objects[kind] = count
        DELETED.labels(kind).inc(count)
    # A record is made before its upload, so every object deleted above has a record older
    # than the cutoff; marking those is marking them all (readers then get 410).
    async with db.begin() as session:
        await session.execute(
            update(StoredObject)
            .where(StoredObject.deleted_at.is_(None), StoredObject.created_at < cutoff)
            .values(deleted_at=now)
        )
    abandoned = now - min(timedelta(seconds=store.settings.retention_s), ABANDONED_AFTER)
    for kind in ("outputs", "logs"):
        for key, upload_id in await asyncio.to_thread(store.stale_uploads, kind, abandoned):
            await asyncio.to_thread(store.abort_multipart, kind, key, upload_id)
            swept.uploads_aborted += 1
    return swept


async def run(db: async_sessionmaker, store: ObjectStore) -> None:
    """Sweeps every sweep_interval_s until cancelled; a failed pass is logged and retried
    at the next interval."""
    while True:
        try:
            swept = await sweep(db, store)
        except Exception:
            SWEEPS.labels("failed").inc()
            log.exception("retention sweep failed")
        else:
            SWEEPS.labels("ok").inc()
            if swept.files or any(swept.objects.values()) or swept.uploads_aborted:
                log.info(
                    "retention sweep deleted expired data",
                    extra={
                        "files": swept.files,
                        "objects": swept.objects,
                        "uploads_aborted": swept.uploads_aborted,
                    },
                )
        await asyncio.sleep(store.settings.sweep_interval_s)
