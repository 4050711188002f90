"""The S3 boundary: buckets, presigned URLs, multipart uploads, deletion and lifecycle
rules (MinIO, SeaweedFS or any S3)."""

import base64
import logging
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Expiration, LifecycleConfig, Rule

from storage_service.settings import StorageSettings

BUCKET_KINDS = ("inputs", "outputs", "logs")
# DeleteObjects takes at most 1,000 keys a request.
DELETE_BATCH = 1000

log = logging.getLogger(__name__)


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


def checksum_param(sha256_hex: str) -> dict[str, str]:
    """S3's x-amz-checksum-sha256 (base64 of the digest) as a query parameter: signed into a
    presigned URL, so the server refuses any other bytes and the holder can't drop it."""
    digest = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"x-amz-checksum-sha256": digest}


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

    # --- presigned URLs: signing is local, no round trip to S3 ---------------------------

    def presign(self, kind: str, key: str, method: str) -> tuple[str, datetime]:
        urls, expires_at = self.presign_many(kind, [key], method)
        return urls[0], expires_at

    def presign_many(self, kind: str, keys: list[str], method: str) -> tuple[list[str], datetime]:
        """URLs scoped to one object each."""
        ttl = timedelta(seconds=self.settings.url_ttl_s)
        bucket = self.settings.bucket(kind)
        sign = (
            self.signer.presigned_put_object
            if method == "PUT"
            else self.signer.presigned_get_object
        )
        return [sign(bucket, key, expires=ttl) for key in keys], datetime.now(UTC) + ttl

    def presign_put(self, kind: str, key: str, sha256: str | None, ttl: timedelta) -> str:
        """A PUT URL for one object; with `sha256` (and bind_checksums) only those bytes."""
        params = checksum_param(sha256) if sha256 and self.settings.bind_checksums else None
        return self.signer.get_presigned_url(
            "PUT", self.settings.bucket(kind), key, expires=ttl, extra_query_params=params
        )

    def presign_parts(
        self, kind: str, key: str, upload_id: str, count: int, ttl: timedelta
    ) -> list[str]:
        """UploadPart URLs for parts 1..count of one multipart upload."""
        bucket = self.settings.bucket(kind)
        return [
            self.signer.get_presigned_url(
                "PUT",
                bucket,
                key,
                expires=ttl,
                extra_query_params={"partNumber": str(n), "uploadId": upload_id},
            )
            for n in range(1, count + 1)
        ]

    # --- multipart uploads -----------------------------------------------------------
    # minio-py keeps these calls private (its put_object drives them itself); they are the
    # plain S3 operations, and we need them split across processes: storage_service starts
    # and completes the upload, the daemon sends the parts.

    def start_multipart(self, kind: str, key: str) -> str:
        return self.client._create_multipart_upload(self.settings.bucket(kind), key, {})

    def complete_multipart(
        self, kind: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> int:
        """Joins the parts into the object; returns its size as stored."""
        bucket = self.settings.bucket(kind)
        self.client._complete_multipart_upload(
            bucket, key, upload_id, [Part(number, etag) for number, etag in parts]
        )
        return self.client.stat_object(bucket, key).size or 0

    def size_of(self, kind: str, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        try:
            return self.client.stat_object(self.settings.bucket(kind), key).size or 0
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise

    def abort_multipart(self, kind: str, key: str, upload_id: str) -> None:
        try:
            self.client._abort_multipart_upload(self.settings.bucket(kind), key, upload_id)
        except S3Error as exc:
            if exc.code != "NoSuchUpload":
                raise

    def stale_uploads(self, kind: str, before: datetime) -> list[tuple[str, str]]:
        """(key, upload id) of multipart uploads started before `before` and never ended."""
        bucket = self.settings.bucket(kind)
        stale: list[tuple[str, str]] = []
        key_marker: str | None = None
        upload_marker: str | None = None
        while True:
            page = self.client._list_multipart_uploads(
                bucket, key_marker=key_marker, upload_id_marker=upload_marker
            )
            for upload in page.uploads:
                if upload.initiated_time is not None and upload.initiated_time < before:
                    stale.append((upload.object_name, upload.upload_id))
            if not page.is_truncated:
                return stale
            key_marker, upload_marker = page.next_key_marker, page.next_upload_id_marker

    # --- deletion and retention ------------------------------------------------------

    def remove(self, kind: str, keys: list[str]) -> None:
        """Deletes objects (a missing one is no error)."""
        bucket = self.settings.bucket(kind)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [DeleteObject(k) for k in keys[start : start + DELETE_BATCH]]
            errors = list(self.client.remove_objects(bucket, batch))
            if errors:
                raise RuntimeError(f"deleting from {bucket}: {errors[0]}")

    def remove_modified_before(self, kind: str, before: datetime) -> int:
        """Deletes every object last modified before `before`, listing the whole bucket
        and deleting as it goes; returns how many."""
        bucket = self.settings.bucket(kind)
        batch: list[str] = []
        removed = 0
        for obj in self.client.list_objects(bucket, recursive=True):
            if obj.object_name and obj.last_modified is not None and obj.last_modified < before:
                batch.append(obj.object_name)
            if len(batch) == DELETE_BATCH:
                self.remove(kind, batch)
                removed, batch = removed + len(batch), []
        self.remove(kind, batch)
        return removed + len(batch)

    def set_expiry_rules(self, kind: str, days: int) -> bool:
        """Asks the server to expire objects `days` after upload and to abort multipart
        uploads left unfinished for a day. False where the server refuses lifecycle rules."""
        bucket = self.settings.bucket(kind)
        everything = Filter(prefix="")
        expire = Rule(ENABLED, everything, rule_id="retention", expiration=Expiration(days=days))
        abort = Rule(
            ENABLED,
            everything,
            rule_id="abandoned-uploads",
            abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(1),
        )
        for rules in ([expire, abort], [expire]):
            try:
                self.client.set_bucket_lifecycle(bucket, LifecycleConfig(rules))
                return True
            except S3Error as exc:
                log.info("lifecycle rules refused on %s: %s", bucket, exc.code)
        return False
