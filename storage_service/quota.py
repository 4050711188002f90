"""What a user stores against the quota: input files plus the outputs and logs of their
jobs, until retention deletes them."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import Forbidden
from common.sizes import binary_size
from storage_service.models import File, StoredObject
from storage_service.schemas import Usage
from storage_service.settings import StorageSettings

# Namespace of the per-owner advisory locks (the two-key form, apart from single-key locks).
_QUOTA_LOCK_SPACE = 7_031_002


class QuotaExceeded(Forbidden):
    """Refused: the user's stored bytes would pass the quota. The body says by how much."""

    def __init__(self, detail: str, usage: Usage, size: int | None = None) -> None:
        super().__init__(detail, field="size" if size is not None else None)
        self.usage = usage
        self.size = size

    def body(self) -> dict:
        extra = {"used_bytes": self.usage.used_bytes, "quota_bytes": self.usage.quota_bytes}
        if self.size is not None:
            extra["size"] = self.size
        return {**super().body(), **extra}


def retention_cutoff(settings: StorageSettings, now: datetime | None = None) -> datetime:
    """Anything uploaded before this has expired."""
    return (now or datetime.now(UTC)) - timedelta(seconds=settings.retention_s)


async def lock_owner(session: AsyncSession, owner_id: str) -> None:
    """Serializes one owner's quota checks until the transaction ends, so two uploads at
    once can't both squeeze under it."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(:space, hashtext(:owner))"),
        {"space": _QUOTA_LOCK_SPACE, "owner": owner_id},
    )


async def usage(session: AsyncSession, settings: StorageSettings, owner_id: str) -> Usage:
    cutoff = retention_cutoff(settings)
    files = await session.scalar(
        select(func.coalesce(func.sum(File.size), 0)).where(
            File.owner_id == owner_id, File.created_at >= cutoff
        )
    )
    rows = await session.execute(
        select(StoredObject.bucket, func.coalesce(func.sum(StoredObject.size), 0))
        .where(
            StoredObject.owner_id == owner_id,
            StoredObject.deleted_at.is_(None),
            StoredObject.created_at >= cutoff,
        )
        .group_by(StoredObject.bucket)
    )
    by_bucket = {bucket: int(total) for bucket, total in rows.all()}
    outputs, logs = by_bucket.get("outputs", 0), by_bucket.get("logs", 0)
    return Usage(
        used_bytes=int(files or 0) + outputs + logs,
        quota_bytes=settings.quota_bytes,
        files_bytes=int(files or 0),
        outputs_bytes=outputs,
        logs_bytes=logs,
        retention_s=settings.retention_s,
    )


def describe(used: Usage) -> str:
    return f"{binary_size(used.used_bytes)} used of a {binary_size(used.quota_bytes)} quota"


def over_quota(used: Usage) -> QuotaExceeded | None:
    """The refusal of new work for a user already past the quota (outputs may put them
    there), or None."""
    if used.used_bytes <= used.quota_bytes:
        return None
    return QuotaExceeded(
        f"storage quota exceeded: {describe(used)}. Delete files (DELETE /v1/files/{{id}}) "
        "or wait for old outputs to expire, then submit again",
        used,
    )


async def check_room(
    session: AsyncSession, settings: StorageSettings, owner_id: str, size: int
) -> None:
    """Refuses a new file of `size` bytes that would take the owner past the quota."""
    await lock_owner(session, owner_id)
    used = await usage(session, settings, owner_id)
    if used.used_bytes + size > used.quota_bytes:
        raise QuotaExceeded(
            f"storage quota exceeded: {describe(used)}, and this file is {binary_size(size)}. "
            "Delete files (DELETE /v1/files/{id}) or wait for old outputs to expire",
            used,
            size,
        )
