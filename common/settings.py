"""Settings base: every service reads GPUMARKET_* environment variables."""

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_INTERNAL_TOKEN = "dev-internal-token-change-me"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUMARKET_", extra="ignore")

    dev_mode: bool = False
    log_level: str = "INFO"
    database_url: str = "postgresql+asyncpg://gpumarket@127.0.0.1:5432/gpumarket"
    nats_url: str = "nats://127.0.0.1:4222"
    # Guards the /internal routes that services call on each other.
    internal_token: str = DEV_INTERNAL_TOKEN
    # Larger request bodies get a 413 (1 MiB; uploads go straight to object storage).
    max_request_body_bytes: int = Field(default=1_048_576, gt=0)
    # Where others reach this instance, for its Consul registration (with CONSUL_HTTP_ADDR);
    # the host defaults to the address the hostname resolves to.
    advertise_host: str | None = None
    advertise_port: int | None = None

    @model_validator(mode="after")
    def _no_default_secret_in_production(self) -> "ServiceSettings":
        if not self.dev_mode and self.internal_token == DEV_INTERNAL_TOKEN:
            raise ValueError(
                "GPUMARKET_INTERNAL_TOKEN must be set to a secret outside dev mode "
                "(or set GPUMARKET_DEV_MODE=true for local development)"
            )
        return self
