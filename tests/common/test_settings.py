"""Settings from secret files (compose and Kubernetes mount them at /run/secrets) and the
database password that is kept out of the database URL."""

import warnings
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from common import settings as settings_module
from common.settings import (
    DEV_INTERNAL_TOKEN,
    DatabaseSettings,
    ServiceSettings,
    database_url_with_password,
)
from migrations.runner import alembic_config
from storage_service.settings import StorageSettings

URL = "postgresql+asyncpg://gpumarket@postgres:5432/gpumarket"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("INTERNAL_TOKEN", "DATABASE_URL", "DATABASE_PASSWORD", "S3_ACCESS_KEY"):
        monkeypatch.delenv(f"GPUMARKET_{name}", raising=False)
    monkeypatch.delenv(settings_module.SECRETS_DIR_ENV, raising=False)
    # Whatever this machine has at /run/secrets stays out of these tests.
    monkeypatch.setattr(settings_module, "DEFAULT_SECRETS_DIR", tmp_path / "absent")


def write_secrets(directory: Path, **files: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name, value in files.items():
        (directory / name).write_text(value)
    return directory


class TestSecretFiles:
    def test_read_from_the_named_dir(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        secrets = write_secrets(
            tmp_path / "s",
            gpumarket_internal_token="from-file\n",
            gpumarket_s3_access_key="access",
        )
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(secrets))
        settings = StorageSettings()
        assert settings.internal_token == "from-file"  # the trailing newline is dropped
        assert settings.s3_access_key == "access"

    def test_default_dir(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        secrets = write_secrets(tmp_path / "run-secrets", gpumarket_internal_token="t")
        monkeypatch.setattr(settings_module, "DEFAULT_SECRETS_DIR", secrets)
        assert ServiceSettings().internal_token == "t"

    def test_environment_wins(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        secrets = write_secrets(tmp_path / "s", gpumarket_internal_token="from-file")
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(secrets))
        monkeypatch.setenv("GPUMARKET_INTERNAL_TOKEN", "from-env")
        assert ServiceSettings().internal_token == "from-env"

    def test_no_dir_no_warning(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(tmp_path / "missing"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            settings = ServiceSettings(dev_mode=True)
        assert settings.internal_token == DEV_INTERNAL_TOKEN

    def test_default_secret_still_refused(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(write_secrets(tmp_path / "s")))
        with pytest.raises(ValueError, match="GPUMARKET_INTERNAL_TOKEN"):
            ServiceSettings()


class TestDatabasePassword:
    def test_url_unchanged_without_one(self) -> None:
        assert DatabaseSettings(database_url=URL).database_url == URL

    @pytest.mark.parametrize("url", [URL, URL.replace("gpumarket@", "gpumarket:old@")])
    def test_replaces_the_urls_password(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str
    ) -> None:
        password = "p@ss/w:rd%?"  # every character a URL would misread
        secrets = write_secrets(tmp_path / "s", gpumarket_database_password=password + "\n")
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(secrets))
        monkeypatch.setenv("GPUMARKET_DATABASE_URL", url)
        parsed = make_url(DatabaseSettings().database_url)
        assert parsed.password == password
        assert (parsed.username, parsed.host, parsed.port, parsed.database) == (
            "gpumarket",
            "postgres",
            5432,
            "gpumarket",
        )
        # Not shown in the settings' repr.
        assert password not in repr(DatabaseSettings().database_password)

    def test_for_the_cli(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUMARKET_DATABASE_PASSWORD", "s3cret%")
        url = database_url_with_password(URL)
        assert make_url(url).password == "s3cret%"
        # `gpumarket migrate` hands it to Alembic, whose config would read "%" as interpolation.
        assert alembic_config(url).get_main_option("sqlalchemy.url") == url
