from common.settings import ServiceSettings


class StorageSettings(ServiceSettings):
    s3_endpoint: str = "http://127.0.0.1:9000"
    # What presigned URLs point at: the address requesters and daemons can reach.
    s3_public_endpoint: str | None = None
    s3_access_key: str = "gpumarket"
    s3_secret_key: str = "gpumarket-secret"
    s3_region: str = "us-east-1"
    bucket_prefix: str = "gpumarket"
    url_ttl_s: int = 900
    max_file_size: int = 50 * 1024**3

    def bucket(self, kind: str) -> str:
        return f"{self.bucket_prefix}-{kind}"
