from pydantic import Field

from common.settings import ServiceSettings

MIB = 1024**2
GIB = 1024**3
# S3's limits: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 of them,
# and a SigV4 presigned URL lives at most 7 days.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB
MAX_PARTS = 10_000
MAX_URL_TTL_S = 7 * 24 * 3600


class StorageSettings(ServiceSettings):
    s3_endpoint: str = "http://127.0.0.1:9000"
    # What presigned URLs point at: the address requesters and daemons can reach.
    s3_public_endpoint: str | None = None
    s3_access_key: str = "gpumarket"
    s3_secret_key: str = "gpumarket-secret"
    s3_region: str = "us-east-1"
    bucket_prefix: str = "gpumarket"
    url_ttl_s: int = Field(default=900, gt=0, le=MAX_URL_TTL_S)
    max_file_size: int = 50 * GIB
    # Upload URLs of a task's outputs live url_ttl_s plus the time all its bytes take at
    # this rate: the last file is sent long after the plan when the first is 100 GiB.
    upload_min_bytes_per_s: int = Field(default=10 * MIB, gt=0)
    # Outputs this big or bigger go up in parts (each with its own URL and retries).
    multipart_threshold: int = Field(default=64 * MIB, ge=MIN_PART_SIZE)
    part_size: int = Field(default=64 * MIB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    # PUT URLs carry the sha256 the bytes must have (x-amz-checksum-sha256, signed into the
    # query): the S3 server refuses other bytes. SeaweedFS and AWS check it.
    bind_checksums: bool = True
    # Per user: input files plus job outputs and logs still kept.
    quota_bytes: int = Field(default=100 * GIB, ge=0)
    # Inputs, outputs and logs are deleted this long after upload.
    retention_s: float = Field(default=30 * 24 * 3600, gt=0)
    sweep_interval_s: float = Field(default=3600, gt=0)
    # Also ask the S3 server to expire outputs and logs itself (whole days, where supported).
    lifecycle_rules: bool = True

    def bucket(self, kind: str) -> str:
        return f"{self.bucket_prefix}-{kind}"
