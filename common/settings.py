"""Settings base: every service reads GPUMARKET_* environment variables, then secret files.

A field's secret file is named like its environment variable, in lower case
(`/run/secrets/gpumarket_internal_token`), in /run/secrets (where compose and Kubernetes
put them) or the directory GPUMARKET_SECRETS_DIR names. Environment variables win.
"""

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

DEV_INTERNAL_TOKEN = "dev-internal-token-change-me"
SECRETS_DIR_ENV = "GPUMARKET_SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/run/secrets")


def secrets_dir() -> Path | None:
    """Where secret files are read from; None when that directory doesn't exist (pydantic-
    settings warns about a missing one, and most processes have none)."""
    path = Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)
    return path if path.is_dir() else None


class DatabaseSettings(BaseSettings):
    """What every process that opens the database needs; `gpumarket migrate` and
    `gpumarket admin` use it alone (they need no service secrets)."""

    model_config = SettingsConfigDict(env_prefix="GPUMARKET_", extra="ignore")

    database_url: str = "postgresql+asyncpg://gpumarket@127.0.0.1:5432/gpumarket"
    # Replaces the URL's password, so the URL can be given without it and the password
    # come from a secret file shared with Postgres (POSTGRES_PASSWORD_FILE).
    database_password: SecretStr | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Looked up per instance, not at import: the directory may appear later (tests).
        directory = secrets_dir()
        if directory is not None:
            file_secret_settings = SecretsSettingsSource(settings_cls, secrets_dir=directory)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _apply_database_password(self) -> "DatabaseSettings":
        if self.database_password is not None:
            url = make_url(self.database_url).set(
                password=self.database_password.get_secret_value()
            )
            self.database_url = url.render_as_string(hide_password=False)
        return self


def database_url_with_password(database_url: str) -> str:
    """`database_url` with the password from GPUMARKET_DATABASE_PASSWORD or its secret file,
    if there is one; for the CLI commands that take the URL as an option."""
    return DatabaseSettings(database_url=database_url).database_url


class ServiceSettings(DatabaseSettings):
    dev_mode: bool = False
    log_level: str = "INFO"
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
