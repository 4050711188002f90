"""compose.yaml must speak the code's language: settings it sets exist, modules it runs exist."""

import importlib
from pathlib import Path

import yaml

from auth_service.settings import AuthSettings
from gateway.settings import GatewaySettings
from provider_registry.settings import RegistrySettings
from scheduler.settings import SchedulerSettings
from storage_service.settings import StorageSettings

COMPOSE = yaml.safe_load((Path(__file__).parents[1] / "compose.yaml").read_text())
SETTINGS = (AuthSettings, GatewaySettings, RegistrySettings, SchedulerSettings, StorageSettings)


def test_every_setting_compose_sets_exists_in_some_service() -> None:
    known = {f"GPUMARKET_{name.upper()}" for s in SETTINGS for name in s.model_fields}
    for name, service in COMPOSE["services"].items():
        for var in service.get("environment", {}):
            if var.startswith("GPUMARKET_"):
                assert var in known, f"{name} sets {var}, which no settings class reads"


def test_every_command_names_an_existing_module() -> None:
    for name, service in COMPOSE["services"].items():
        command = service.get("command", [])
        if command[:1] == ["uvicorn"]:
            module, factory = command[1].split(":")
            assert callable(getattr(importlib.import_module(module), factory)), name
        elif command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, name
