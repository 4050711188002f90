"""storage_service as the gateway calls it: presigned URLs (many objects per call), upload
plans for a task's results, and a user's storage usage."""

import time
from datetime import datetime

from common.aio import Flights
from gateway.clients import ServiceClient
from storage_service.schemas import (
    CompletedObject,
    ObjectToUpload,
    UploadedPart,
    UploadsPlan,
    Usage,
)

SLOW_CALL_S = 120.0
# Usage under this share of the quota may be answered from UsageCache for a few seconds.
ROOMY_SHARE = 0.9


async def presign(
    storage: ServiceClient, bucket: str, keys: list[str], method: str
) -> tuple[list[str], datetime | None]:
    """One URL per key, in order; (no URLs, None) for no keys. Outputs and logs that
    retention deleted are a 410 (storage's own answer, passed on)."""
    if not keys:
        return [], None
    signed = await storage.request(
        "POST", "/internal/presign", json={"bucket": bucket, "keys": keys, "method": method}
    )
    return signed["urls"], signed["expires_at"]


async def plan_uploads(
    storage: ServiceClient, owner_id: str, bucket: str, objects: list[ObjectToUpload]
) -> UploadsPlan:
    """Upload URLs (a PUT each, or parts for big ones), counted against `owner_id`."""
    body = {
        "owner_id": owner_id,
        "bucket": bucket,
        "objects": [o.model_dump(exclude_none=True) for o in objects],
    }
    # Signing thousands of part URLs takes a moment.
    answer = await storage.request("POST", "/internal/uploads", json=body, timeout=SLOW_CALL_S)
    return UploadsPlan.model_validate(answer)


async def complete_upload(
    storage: ServiceClient, bucket: str, key: str, upload_id: str, parts: list[UploadedPart]
) -> CompletedObject:
    body = {
        "bucket": bucket,
        "key": key,
        "upload_id": upload_id,
        "parts": [p.model_dump() for p in parts],
    }
    # S3 may take a while to join thousands of parts.
    answer = await storage.request(
        "POST", "/internal/uploads/complete", json=body, timeout=SLOW_CALL_S
    )
    return CompletedObject.model_validate(answer)


async def abort_upload(storage: ServiceClient, bucket: str, key: str, upload_id: str) -> None:
    body = {"bucket": bucket, "key": key, "upload_id": upload_id}
    await storage.request("POST", "/internal/uploads/abort", json=body)


async def usage(storage: ServiceClient, owner_id: str) -> Usage:
    answer = await storage.request("GET", "/internal/usage", params={"owner_id": owner_id})
    return Usage.model_validate(answer)


class UsageCache:
    """Recent answers of usage() per owner, so a burst of submissions asks storage once.
    Only answers well under the quota are kept: near or past it every submission asks
    afresh, so a delete takes effect at once, and a job's outputs can take a user past
    the quota within the few seconds an answer is kept (the quota is soft anyway)."""

    def __init__(self, ttl_s: float = 5.0, max_owners: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_owners = max_owners
        self._known: dict[str, tuple[float, Usage]] = {}
        self._flights: Flights[Usage] = Flights()

    async def get(self, storage: ServiceClient, owner_id: str) -> Usage:
        now = time.monotonic()
        cached = self._known.get(owner_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        answer = await self._flights.run(owner_id, lambda: usage(storage, owner_id))
        if answer.used_bytes > answer.quota_bytes * ROOMY_SHARE:
            self._known.pop(owner_id, None)
            return answer
        if len(self._known) >= self.max_owners:
            self._known.clear()
        self._known[owner_id] = (now + self.ttl_s, answer)
        return answer
