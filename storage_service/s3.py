"""The S3 boundary: bucket creation and presigned URLs (MinIO, SeaweedFS or any S3)."""

from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

from minio import Minio

from storage_service.settings import StorageSettings

BUCKET_KINDS = ("inputs", "outputs", "logs")


def _client(endpoint: str, settings: StorageSettings) -> Minio:
    url = urlparse(endpoint)
    # region given: presigning then needs no round trip to the server.
    return Minio(
        url.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=url.scheme == "https",
        region=settings.s3_region,
    )


class ObjectStore:
    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.client = _client(settings.s3_endpoint, settings)
        self.signer = _client(settings.s3_public_endpoint or settings.s3_endpoint, settings)

    def ensure_buckets(self) -> None:
        for kind in BUCKET_KINDS:
            name = self.settings.bucket(kind)
            if not self.client.bucket_exists(name):
                self.client.make_bucket(name)

    def check(self) -> None:
        self.client.bucket_exists(self.settings.bucket("inputs"))

    def presign(self, kind: str, key: str, method: str) -> tuple[str, datetime]:
        urls, expires_at = self.presign_many(kind, [key], method)
        return urls[0], expires_at

    def presign_many(self, kind: str, keys: list[str], method: str) -> tuple[list[str], datetime]:
        """URLs scoped to one object each; signing is local, no round trip to S3."""
        ttl = timedelta(seconds=self.settings.url_ttl_s)
        bucket = self.settings.bucket(kind)
        sign = (
            self.signer.presigned_put_object
            if method == "PUT"
            else self.signer.presigned_get_object
        )
        return [sign(bucket, key, expires=ttl) for key in keys], datetime.now(UTC) + ttl
