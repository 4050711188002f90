from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from common.types import SafeStr, Sha256

UploadBucket = Literal["outputs", "logs"]


class FileCreate(BaseModel):
    owner_id: str
    filename: SafeStr = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    sha256: Sha256


class FileUpload(BaseModel):
    file_id: str
    filename: str
    size: int
    sha256: str
    upload_url: str
    expires_at: datetime


class FileOut(BaseModel):
    file_id: str
    filename: str
    size: int
    # None for files registered before checksums were required.
    sha256: str | None = None
    download_url: str
    expires_at: datetime


class Usage(BaseModel):
    """A user's stored bytes against the quota; outputs may push `used` past it."""

    used_bytes: int
    quota_bytes: int
    files_bytes: int
    outputs_bytes: int
    logs_bytes: int
    # How long inputs, outputs and logs are kept after upload.
    retention_s: float


class PresignRequest(BaseModel):
    """Many objects of one bucket at once: a task's outputs are signed in one call."""

    bucket: Literal["inputs", "outputs", "logs"]
    keys: list[SafeStr] = Field(min_length=1, max_length=10_000)
    method: Literal["GET", "PUT"]


class PresignedUrls(BaseModel):
    urls: list[str]  # in the order of the keys
    expires_at: datetime


class ObjectToUpload(BaseModel):
    key: SafeStr = Field(min_length=1, max_length=2048)
    size: int = Field(ge=0)
    sha256: Sha256 | None = None


class UploadsRequest(BaseModel):
    """Upload URLs for a task's outputs (or its log), recorded against their owner."""

    owner_id: str
    bucket: UploadBucket
    objects: list[ObjectToUpload] = Field(max_length=10_000)


class MultipartPlan(BaseModel):
    upload_id: str
    part_size: int  # every part but the last has exactly this many bytes
    part_urls: list[str]  # part n (from 1) goes to part_urls[n - 1]


class PlannedUpload(BaseModel):
    """One object: a single PUT to `url`, or parts for a big one (then `url` is None)."""

    key: str
    url: str | None = None
    multipart: MultipartPlan | None = None


class UploadsPlan(BaseModel):
    uploads: list[PlannedUpload]  # in the order of the objects
    expires_at: datetime


class UploadedPart(BaseModel):
    part_number: int = Field(ge=1, le=10_000)
    etag: SafeStr = Field(min_length=1, max_length=200)


class MultipartRef(BaseModel):
    bucket: UploadBucket
    key: SafeStr = Field(min_length=1, max_length=2048)
    upload_id: SafeStr = Field(min_length=1, max_length=1024)


class CompleteMultipart(MultipartRef):
    parts: list[UploadedPart] = Field(min_length=1, max_length=10_000)


class CompletedObject(BaseModel):
    key: str
    size: int
