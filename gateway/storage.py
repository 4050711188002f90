"""Presigned URLs from storage_service, many objects per call."""

from datetime import datetime

from gateway.clients import ServiceClient


async def presign(
    storage: ServiceClient, bucket: str, keys: list[str], method: str
) -> tuple[list[str], datetime | None]:
    """One URL per key, in order; (no URLs, None) for no keys."""
    if not keys:
        return [], None
    signed = await storage.request(
        "POST", "/internal/presign", json={"bucket": bucket, "keys": keys, "method": method}
    )
    return signed["urls"], signed["expires_at"]
