import stat
from pathlib import Path

import pytest

from provider_daemon.config import (
    ProviderConfig,
    default_config_path,
    load_config,
    read_machine_id,
    save_config,
)
from provider_daemon.errors import ConfigError


def make_config(**fields: object) -> ProviderConfig:
    values: dict[str, object] = {
        "api_url": "http://api.example",
        "machine_id": "5b7c1f0e-0c1a-4d43-9a43-3f3c0b7d8a11",
        "name": "rig-1",
        "provider_id": "p1",
        "credential": "secret-credential",
        "nats_url": "nats://127.0.0.1:4222",
        "heartbeat_interval_s": 5.0,
    }
    values.update(fields)
    return ProviderConfig.model_validate(values)


class TestConfigFile:
    def test_saved_readable_by_owner_only_in_a_new_directory(self, tmp_path: Path) -> None:
        path = tmp_path / "deep" / "dir" / "provider.json"
        save_config(make_config(prices={"RTX 4090": 0.7}), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loaded = load_config(path)
        assert loaded.credential == "secret-credential"
        assert loaded.prices == {"RTX 4090": 0.7}
        assert read_machine_id(path) == "5b7c1f0e-0c1a-4d43-9a43-3f3c0b7d8a11"

    def test_overwriting_a_loose_file_tightens_it(self, tmp_path: Path) -> None:
        path = tmp_path / "provider.json"
        path.write_text("{}")
        path.chmod(0o644)
        save_config(make_config(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_missing_config_says_to_join(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="provider-daemon join"):
            load_config(tmp_path / "none.json")
        assert read_machine_id(tmp_path / "none.json") is None

    def test_invalid_config_names_the_field(self, tmp_path: Path) -> None:
        path = tmp_path / "provider.json"
        path.write_text('{"api_url": "http://x"}')
        with pytest.raises(ConfigError, match="machine_id"):
            load_config(path)

    def test_default_path_follows_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("GPUMARKET_PROVIDER_CONFIG", str(tmp_path / "x.json"))
        assert default_config_path() == tmp_path / "x.json"
        monkeypatch.delenv("GPUMARKET_PROVIDER_CONFIG")
        assert default_config_path().parts[-3:] == (".config", "gpumarket", "provider.json")
