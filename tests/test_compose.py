"""compose.yaml, the Dockerfiles and deploy/ must speak the code's language: the settings,
secret files, modules, ports and paths they name exist, and the files agree with each other."""

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from auth_service.settings import AuthSettings
from common import settings as settings_module
from common.discovery import SERVICE_TAG, consul_name
from common.settings import DatabaseSettings
from gateway.settings import GatewaySettings
from gpumarket.cli import app as gpumarket_cli
from provider_daemon.config import CONFIG_ENV
from provider_registry.settings import RegistrySettings
from scheduler.settings import SchedulerSettings
from storage_service.settings import StorageSettings

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The environment every platform service shares (compose.yaml's x-service anchor).
SHARED_ENV = COMPOSE["x-service"]["environment"]
# The settings class each process of ours reads.
SETTINGS_OF: dict[str, type[BaseSettings]] = {
    "auth_service": AuthSettings,
    "gateway": GatewaySettings,
    "provider_registry": RegistrySettings,
    "scheduler": SchedulerSettings,
    "storage_service": StorageSettings,
    "migrate": DatabaseSettings,
}
ALL_SETTINGS = (*SETTINGS_OF.values(),)
# What the third-party images listen on: their defaults and the flags compose.yaml passes.
IMAGE_PORTS = {
    "nats": {4222, 8222},
    "postgres": {5432},
    "minio": {9000, 9001},
    "consul": {8500},
    "prometheus": {9090},
    "grafana": {3000},
}
# Environment variables of ours that are not settings fields.
OTHER_VARIABLES = {settings_module.SECRETS_DIR_ENV, CONFIG_ENV}
SECRETS_MOUNT = PurePosixPath("/run/secrets")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, with the default; a required ${VAR:?...} is a failure:
    the stack must start from the files alone."""

    def default(m: re.Match[str]) -> str:
        assert m["op"] == ":-", f"{m[0]}: compose must need no variable (secrets are files)"
        return m["default"]

    return re.sub(r"\$\{(?P<name>\w+)(?P<op>:-|:\?|-|\?)?(?P<default>[^}]*)\}", default, value)


def environment(service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in SERVICES[service].get("environment", {}).items()}


def is_ours(service: str) -> bool:
    return SERVICES[service].get("image") == "gpumarket:latest"


def listening_ports(service: str) -> set[int]:
    if service in IMAGE_PORTS:
        return IMAGE_PORTS[service]
    command = SERVICES[service]["command"]
    if command[0] == "uvicorn":
        return {int(command[command.index("--port") + 1])}
    if service == "scheduler":
        return {int(environment(service)["GPUMARKET_HTTP_PORT"])}
    return set()


def published_ports(service: str) -> set[int]:
    # "HOST:CONTAINER" or "IP:HOST:CONTAINER": the host's side.
    return {int(p.split(":")[-2]) for p in SERVICES[service].get("ports", [])}


def mounts(service: str) -> dict[PurePosixPath, Path]:
    """Bind mounts of repository folders: container path -> host path."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):  # not a named volume
            out[PurePosixPath(target)] = ROOT / source
    return out


def host_path(service: str, container_path: str) -> Path | None:
    """The repository file a container path of `service` comes from, if it is bind-mounted."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    return None


def mounted_secret(service: str, file_variable: str) -> str:
    """The secret an image's *_FILE variable names (a path, or MinIO's name under
    /run/secrets), checked to be mounted in that service."""
    path = PurePosixPath(environment(service)[file_variable])
    if path.is_absolute():
        assert path.parent == SECRETS_MOUNT, f"{service}: {file_variable}={path}"
    assert path.name in SERVICES[service]["secrets"], f"{service}: {path.name} is not mounted"
    return path.name


def secret_field(name: str) -> str:
    assert name.startswith("gpumarket_"), name
    return name.removeprefix("gpumarket_")


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secret files scripts/make-secrets.sh makes."""
    directory = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run([ROOT / "scripts" / "make-secrets.sh", directory], check=True)
    return directory


class TestCompose:
    def test_docker_compose_accepts_it(self, tmp_path: Path, secret_files: Path) -> None:
        docker_compose = shutil.which("docker-compose")
        if docker_compose is None:
            pytest.skip("docker-compose is not installed (scripts/install.sh installs it)")
        shutil.copy(ROOT / "compose.yaml", tmp_path)
        shutil.copytree(secret_files, tmp_path / "secrets")
        # No variable from this machine: the defaults in the file must be enough.
        result = subprocess.run(
            [docker_compose, "config"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        rendered = yaml.safe_load(result.stdout)
        assert set(rendered["services"]) == set(SERVICES)
        assert rendered["services"]["scheduler"]["deploy"]["replicas"] >= 2

    def test_scheduler_scales(self) -> None:
        scheduler = SERVICES["scheduler"]
        # `--scale scheduler=N` needs N distinct names and no host port to fight over.
        assert "container_name" not in scheduler
        assert "ports" not in scheduler
        assert scheduler["deploy"]["replicas"] >= 2

    def test_restart_policies_and_health_checks(self) -> None:
        for name, service in SERVICES.items():
            if name == "migrate":
                assert service["restart"] == "no"
                continue
            assert service["restart"] in ("always", "unless-stopped"), name
            assert "healthcheck" in service, name

    def test_no_secret_in_the_environment(self) -> None:
        for name in SERVICES:
            for var, value in environment(name).items():
                if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", var):
                    assert var.endswith("_FILE"), f"{name}: {var} belongs in a secret file"
                if var == "GPUMARKET_DATABASE_URL":
                    assert make_url(value).password is None, f"{name}: password in the URL"


class TestSettings:
    def test_every_setting_compose_sets_exists(self) -> None:
        known = {f"GPUMARKET_{n.upper()}" for s in ALL_SETTINGS for n in s.model_fields}
        for name in SERVICES:
            for var in environment(name):
                if var.startswith("GPUMARKET_"):
                    assert var in known, f"{name} sets {var}, which no settings class reads"
                    # What a service sets beyond the shared block, its own class must read.
                    if var not in SHARED_ENV and name in SETTINGS_OF:
                        field = var.removeprefix("GPUMARKET_").lower()
                        assert field in SETTINGS_OF[name].model_fields, f"{name}: {var}"

    def test_every_command_names_an_existing_module(self) -> None:
        for name, service in SERVICES.items():
            command = service.get("command", [])
            if command[:1] == ["uvicorn"]:
                module, factory = command[1].split(":")
                assert callable(getattr(importlib.import_module(module), factory)), name
            elif command[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(command[2]) is not None, name
            elif command[:1] == ["gpumarket"]:
                result = CliRunner().invoke(gpumarket_cli, [*command[1:], "--help"])
                assert result.exit_code == 0, f"{name}: {command}: {result.output}"

    def test_every_secret_a_service_reads_is_a_setting(self) -> None:
        for name, settings_cls in SETTINGS_OF.items():
            for secret in SERVICES[name]["secrets"]:
                assert secret in COMPOSE["secrets"], f"{name}: {secret} is not defined"
                field = secret_field(secret)
                assert field in settings_cls.model_fields, f"{name}: {secret} is read by no field"

    def test_secret_files_come_from_the_script(self, secret_files: Path) -> None:
        for name, secret in COMPOSE["secrets"].items():
            assert PurePosixPath(secret["file"]) == PurePosixPath("./secrets") / name
            assert (secret_files / name).is_file(), f"make-secrets.sh does not make {name}"
        for name, service in SERVICES.items():
            assert set(service.get("secrets", [])) <= set(COMPOSE["secrets"]), name

    def test_services_share_the_infrastructures_secrets(self) -> None:
        database_password = mounted_secret("postgres", "POSTGRES_PASSWORD_FILE")
        assert secret_field(database_password) == "database_password"
        assert secret_field(mounted_secret("minio", "MINIO_ROOT_USER_FILE")) == "s3_access_key"
        assert secret_field(mounted_secret("minio", "MINIO_ROOT_PASSWORD_FILE")) == "s3_secret_key"
        assert mounted_secret("grafana", "GF_SECURITY_ADMIN_PASSWORD__FILE") in COMPOSE["secrets"]
        for name in SETTINGS_OF:
            assert database_password in SERVICES[name]["secrets"], name

    @pytest.mark.parametrize("name", sorted(SETTINGS_OF))
    def test_settings_load_from_composes_environment_and_secrets(
        self, name: str, secret_files: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        # The container's /run/secrets: only the files mounted in this service.
        run_secrets = tmp_path / "run-secrets"
        run_secrets.mkdir()
        for secret in SERVICES[name]["secrets"]:
            shutil.copy(secret_files / secret, run_secrets / secret)
        for var in [v for v in os.environ if v.startswith("GPUMARKET_")]:
            monkeypatch.delenv(var)
        for var, value in environment(name).items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv(settings_module.SECRETS_DIR_ENV, str(run_secrets))

        settings = SETTINGS_OF[name]()  # a missing secret fails here (the internal token)
        for secret in SERVICES[name]["secrets"]:
            value = getattr(settings, secret_field(secret))
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            assert value == (run_secrets / secret).read_text()
        password = (run_secrets / "gpumarket_database_password").read_text()
        assert make_url(settings.database_url).password == password


class TestAddresses:
    def test_urls_point_at_a_service_port(self) -> None:
        for name in SERVICES:
            for var, value in environment(name).items():
                if not (var.endswith(("_URL", "_ENDPOINT")) or var == "CONSUL_HTTP_ADDR"):
                    continue
                url = urlsplit(value if "://" in value else f"http://{value}")
                if "PUBLIC" in var:
                    # Handed to daemons and requesters: a port this host publishes.
                    published = set().union(*(published_ports(s) for s in SERVICES))
                    assert url.port in published, f"{name}: {var}={value}"
                    continue
                assert url.hostname in SERVICES, f"{name}: {var}={value}: no such service"
                assert url.port in listening_ports(url.hostname), f"{name}: {var}={value}"

    def test_healthchecks_hit_a_served_port(self) -> None:
        for name, service in SERVICES.items():
            test = " ".join(service.get("healthcheck", {}).get("test", []))
            ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", test)}
            ports |= {int(p) for p in re.findall(r"-p (\d+)", test)}
            assert ports <= listening_ports(name), f"{name}: {test}"
            if is_ours(name) and name != "migrate":
                assert "/healthz" in test and ports, name

    def test_published_ports_are_served(self) -> None:
        for name, service in SERVICES.items():
            for mapping in service.get("ports", []):
                assert int(mapping.split(":")[-1]) in listening_ports(name), f"{name}: {mapping}"


class TestPrometheus:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())

    def test_config_file_is_the_mounted_one(self) -> None:
        flag = next(a for a in SERVICES["prometheus"]["command"] if "--config.file=" in a)
        path = host_path("prometheus", flag.split("=", 1)[1])
        assert path == ROOT / "deploy/prometheus/prometheus.yml"

    def test_rule_files_are_mounted(self) -> None:
        assert self.config["rule_files"]
        for rule_file in self.config["rule_files"]:
            path = host_path("prometheus", rule_file)
            assert path is not None, f"{rule_file} is not in a folder compose mounts"
            assert path.parent == ROOT / "deploy/prometheus"

    def test_targets_from_consul(self) -> None:
        assert self.config["global"]["scrape_interval"] == "15s"
        jobs = {job["job_name"]: job for job in self.config["scrape_configs"]}
        assert "prometheus" in jobs
        [consul] = [job for job in jobs.values() if "consul_sd_configs" in job]
        [sd] = consul["consul_sd_configs"]
        host, port = sd["server"].split(":")
        assert int(port) in listening_ports(host)
        # Our instances carry the tag they register with.
        assert sd["tags"] == [SERVICE_TAG]
        relabels = {r["target_label"]: r["source_labels"] for r in consul["relabel_configs"]}
        assert relabels["job"] == ["__meta_consul_service"]
        assert relabels["instance"] == ["__address__"]

    def test_job_names_are_the_consul_names(self) -> None:
        # What alerts and dashboards select on: `job="provider-registry"`, ...
        names = {consul_name(s) for s in SETTINGS_OF if s != "migrate"}
        assert names == {
            "gateway",
            "auth-service",
            "storage-service",
            "provider-registry",
            "scheduler",
        }

    def test_promtool_accepts_it(self, tmp_path: Path) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed")
        # Debian's Prometheus is built without Consul discovery: check the rest of the file
        # with the Consul block swapped for a static one.
        config = json.loads(json.dumps(self.config))
        for job in config["scrape_configs"]:
            if job.pop("consul_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["gateway:8000"]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestGrafana:
    folder = ROOT / "deploy/grafana/provisioning"

    def test_provisioning_is_mounted(self) -> None:
        assert host_path("grafana", "/etc/grafana/provisioning") == self.folder
        assert any(
            v.endswith(":/etc/grafana/provisioning:ro") for v in SERVICES["grafana"]["volumes"]
        )

    def test_datasource(self) -> None:
        file = yaml.safe_load((self.folder / "datasources/prometheus.yaml").read_text())
        [source] = file["datasources"]
        assert source["uid"] == "prometheus"
        assert source["type"] == "prometheus"
        url = urlsplit(source["url"])
        assert url.port in listening_ports(url.hostname)

    def test_dashboards_come_from_the_mounted_folder(self) -> None:
        file = yaml.safe_load((self.folder / "dashboards/gpumarket.yaml").read_text())
        [provider] = file["providers"]
        assert provider["type"] == "file"
        assert (
            host_path("grafana", provider["options"]["path"]) == ROOT / "deploy/grafana/dashboards"
        )

    def test_dashboards_use_the_datasource(self) -> None:
        def uids(node: Any) -> set[str]:
            if isinstance(node, list):
                return set().union(*map(uids, node)) if node else set()
            if not isinstance(node, dict):
                return set()
            found = set().union(*map(uids, node.values())) if node else set()
            source = node.get("datasource")
            if isinstance(source, dict) and source.get("type") == "prometheus":
                found.add(source.get("uid"))
            return found

        for path in (ROOT / "deploy/grafana/dashboards").glob("*.json"):
            assert uids(json.loads(path.read_text())) <= {"prometheus"}, path.name


class TestImages:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    @staticmethod
    def instructions(dockerfile: str) -> list[tuple[str, str]]:
        text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
        lines = [line.strip() for line in text.splitlines()]
        return [
            (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines
            if line and not line.startswith("#")
        ]

    @pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.daemon"])
    def test_multi_stage_non_root(self, dockerfile: str) -> None:
        steps = self.instructions(dockerfile)
        assert sum(op == "FROM" for op, _ in steps) == 2
        user = [arg for op, arg in steps if op == "USER"][-1]
        assert not user.startswith(("0", "root")), user
        for op, arg in steps:
            if op in ("ENV", "ARG"):
                assert not re.search(r"TOKEN|PASSWORD|SECRET", arg, re.I), arg

    def test_services_image_holds_every_package(self) -> None:
        copied = {a.split()[0] for op, a in self.instructions("Dockerfile") if op == "COPY"}
        packages = {
            p.rstrip("*")
            for p in self.pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
        }
        assert packages <= copied

    def test_daemon_image_has_what_the_daemon_imports(self) -> None:
        arg = next(
            a for op, a in self.instructions("Dockerfile.daemon") if a.startswith("DAEMON_DEPS=")
        )
        listed = set(arg.split("=", 1)[1].strip('"').split())
        declared = {
            re.match(r"[\w.-]+", d)[0].lower().replace("_", "-")  # type: ignore[index]
            for d in self.pyproject["project"]["dependencies"]
        }
        assert listed <= declared
        copied = {a.split()[0] for op, a in self.instructions("Dockerfile.daemon") if op == "COPY"}
        ours, theirs = self.daemon_imports()
        assert ours <= copied, f"the daemon imports {ours - copied}, which its image lacks"
        distributions = packages_distributions()
        needed = {d.lower().replace("_", "-") for m in theirs for d in distributions[m]}
        assert needed <= listed, f"Dockerfile.daemon's DAEMON_DEPS lacks {needed - listed}"

    @staticmethod
    def daemon_imports() -> tuple[set[str], set[str]]:
        """The top-level packages that provider_daemon, and the modules of ours it imports,
        import: (ours, third-party)."""
        todo = list((ROOT / "provider_daemon").glob("*.py"))
        seen: set[Path] = set()
        ours: set[str] = set()
        theirs: set[str] = set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for module in names:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names:
                        continue
                    if (ROOT / top).is_dir():
                        spec = importlib.util.find_spec(module)
                        assert spec is not None and spec.origin, module
                        todo.append(Path(spec.origin))
                        ours.add(top)
                    else:
                        theirs.add(top)
        return ours, theirs

    def test_dockerignore_keeps_secrets_out(self) -> None:
        ignored = (ROOT / ".dockerignore").read_text().split()
        assert {"secrets/", ".gpumarket/", ".env"} <= set(ignored)


def test_deploy_doc_names_real_settings() -> None:
    known = {f"GPUMARKET_{n.upper()}" for s in ALL_SETTINGS for n in s.model_fields}
    text = (ROOT / "docs/deploy.md").read_text()
    for var in set(re.findall(r"GPUMARKET_[A-Z0-9_]*[A-Z0-9]", text)):
        assert var in known | OTHER_VARIABLES, f"docs/deploy.md names {var}, which nothing reads"
