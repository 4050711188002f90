"""common.discovery against a fake Consul agent that speaks the parts of Consul's HTTP API we use.

The fake decodes bodies the way Consul (Go's encoding/json) does: keys match case-insensitively,
so py-consul's lowercase `name`/`checks`/`http` mean the same as `Name`/`Checks`/`HTTP`.
"""

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from common import discovery
from common.discovery import (
    NoHealthyInstance,
    RegistrationFailed,
    ServiceResolver,
    consul_address,
    register_service,
)

AGENT_NODE = {"Node": "agent-node", "Address": "10.0.0.9"}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _get(body: dict[str, Any], key: str) -> Any:
    """A JSON key as Go's decoder finds it for a struct field: case-insensitively."""
    return next((v for k, v in body.items() if k.lower() == key.lower()), None)


@dataclass
class Instance:
    service: str
    id: str
    address: str
    port: int
    node: dict[str, str]
    status: str  # the instance's own check: passing | warning | critical
    definition: dict[str, Any] = field(default_factory=dict)  # the register body, decoded


class FakeConsul:
    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []
        self.index = 1
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, service: str, id: str, address: str, port: int, **kw: Any) -> None:
        node = kw.pop("node", {"Node": f"node-{id}", "Address": "10.0.0.1"})
        self.instances[id] = Instance(service, id, address, port, node, kw.get("status", "passing"))
        self.index += 1

    def calls(self, method: str, prefix: str) -> list[tuple[str, str, dict, dict]]:
        return [r for r in self.requests if r[0] == method and r[1].startswith(prefix)]

    # -- the endpoints ------------------------------------------------------------------------

    def register(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, port = _get(body, "Name"), _get(body, "Port")
        if not name:
            return 400, "Missing service name"
        checks = list(_get(body, "Checks") or [])
        if _get(body, "Check"):
            checks.append(_get(body, "Check"))
        for check in checks:
            for key in ("Interval", "Timeout", "DeregisterCriticalServiceAfter"):
                value = _get(check, key)
                if value is not None and not GO_DURATION.match(str(value)):
                    return 400, f"Request decode failed: time: invalid duration {value!r}"
            if _get(check, "HTTP") and not _get(check, "Interval"):
                return 400, "Invalid check: HTTP checks must have an interval"
        service_id = _get(body, "ID") or name
        # An agent's HTTP check starts critical until its first probe passes.
        self.add(name, service_id, _get(body, "Address") or "", port or 0, node=AGENT_NODE)
        self.instances[service_id].status = "critical" if checks else "passing"
        self.instances[service_id].definition = body
        return 200, None

    def deregister(self, service_id: str) -> tuple[int, Any]:
        if self.instances.pop(service_id, None) is None:
            return 404, f'Unknown service ID "{service_id}"'
        self.index += 1
        return 200, None

    def health(self, service: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        # Consul reads ?passing as a bool; presence with no value means true.
        passing = query.get("passing", ["false"])[0].lower() in ("", "1", "true")
        out = []
        for inst in sorted(self.instances.values(), key=lambda i: i.node["Node"]):
            if inst.service != service:
                continue
            checks = [
                {
                    "Node": inst.node["Node"],
                    "CheckID": "serfHealth",
                    "Name": "Serf Health Status",
                    "Status": "passing",
                    "ServiceID": "",
                    "ServiceName": "",
                    "Type": "",
                },
                {
                    "Node": inst.node["Node"],
                    "CheckID": f"service:{inst.id}",
                    "Name": f"Service '{service}' check",
                    "Status": inst.status,
                    "ServiceID": inst.id,
                    "ServiceName": service,
                    "Type": "http",
                },
            ]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append(
                {
                    "Node": {**inst.node, "ID": "", "Datacenter": "dc1", "Meta": {}},
                    "Service": {
                        "ID": inst.id,
                        "Service": service,
                        "Tags": [],
                        "Address": inst.address,
                        "Port": inst.port,
                        "Meta": {},
                        "Weights": {"Passing": 1, "Warning": 1},
                    },
                    "Checks": checks,
                }
            )
        return 200, out

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query, keep_blank_values=True)
                fake.requests.append((method, path, query, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload = 405, "method not allowed"
                if method == "PUT" and path == "/v1/agent/service/register":
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        status, payload = 400, "Request decode failed"
                    else:
                        status, payload = fake.register(body)
                elif method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
                    status, payload = fake.deregister(path.rsplit("/", 1)[1])
                elif method == "GET" and path.startswith("/v1/health/service/"):
                    status, payload = fake.health(path.rsplit("/", 1)[1], query)
                self._reply(status, payload)

            def _reply(self, status: int, payload: Any) -> None:
                if status == 200:
                    data = b"" if payload is None else json.dumps(payload).encode()
                    content_type = "application/json"
                else:
                    data, content_type = str(payload).encode(), "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Consul-Index", str(fake.index))
                self.send_header("X-Consul-Knownleader", "true")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._route("GET")

            def do_PUT(self) -> None:
                self._route("PUT")

        return Handler


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsul]:
    fake = FakeConsul()
    monkeypatch.setenv("CONSUL_HTTP_ADDR", fake.address)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("GPUMARKET_ADVERTISE_HOST", raising=False)
    yield fake
    try:
        fake.stop()
    except OSError:
        pass


class TestAddress:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("127.0.0.1:8500", "http://127.0.0.1:8500"),
            ("http://consul:8500", "http://consul:8500"),
            ("https://consul.example:8501/", "https://consul.example:8501"),
            ("https://consul.example", "https://consul.example:443"),
            ("[::1]:8500", "http://[::1]:8500"),
            ("", None),
        ],
    )
    def test_forms(self, monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", value)
        assert consul_address() == expected

    def test_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
        assert consul_address() is None

    def test_unsupported_scheme(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", "unix:///var/run/consul.sock")
        with pytest.raises(ValueError, match="CONSUL_HTTP_ADDR"):
            consul_address()


class TestNotConfigured:
    async def test_fallback_and_no_registration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = FakeConsul()  # running, but nobody is told where
        try:
            monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
            assert await register_service("auth", 8000) is None
            resolver = ServiceResolver()
            url = await resolver.base_url("auth", "http://auth_service:8000")
            assert url == "http://auth_service:8000"
            assert fake.requests == []
        finally:
            fake.stop()


class TestRegistration:
    async def test_body(self, fake_consul: FakeConsul) -> None:
        reg = await register_service("scheduler", 8010, address="10.1.2.3")
        assert reg is not None
        assert reg.service_id == "scheduler-10.1.2.3-8010"

        [(_, _, query, _)] = fake_consul.calls("PUT", "/v1/agent/service/register")
        assert query == {"replace-existing-checks": ["true"]}
        body = fake_consul.instances["scheduler-10.1.2.3-8010"].definition
        assert _get(body, "Name") == "scheduler"
        assert _get(body, "ID") == "scheduler-10.1.2.3-8010"
        assert _get(body, "Address") == "10.1.2.3"
        assert _get(body, "Port") == 8010
        # Prometheus scrapes the Consul services with this tag (deploy/prometheus).
        assert _get(body, "Tags") == ["gpumarket"]
        [check] = _get(body, "Checks") or [_get(body, "Check")]
        assert _get(check, "HTTP") == "http://10.1.2.3:8010/healthz"
        assert _get(check, "Interval") == "5s"
        assert _get(check, "Timeout") == "2s"
        assert _get(check, "DeregisterCriticalServiceAfter") == "1m"

    async def test_advertised_address_and_token(
        self, fake_consul: FakeConsul, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
        reg = await register_service("gateway", 8000, "gateway-1")
        assert reg is not None and reg.address == "gateway-1"
        assert "gateway-gateway-1-8000" in fake_consul.instances
        [(_, _, _, headers)] = fake_consul.calls("PUT", "/v1/agent/service/register")
        assert headers.get("X-Consul-Token") == "s3cret"

    async def test_own_address_by_default(self, fake_consul: FakeConsul) -> None:
        # In a container the hostname resolves to the container's own address.
        reg = await register_service("gateway", 8000)
        assert reg is not None
        assert reg.address == socket.gethostbyname(socket.gethostname())

    async def test_consul_down_raises(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{_closed_port()}")
        with pytest.raises(RegistrationFailed, match="auth-h-8000"):
            await register_service("auth", 8000, address="h")

    async def test_consul_rejects_raises(
        self, fake_consul: FakeConsul, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(discovery, "CHECK_INTERVAL", "5 seconds")
        with pytest.raises(RegistrationFailed, match="invalid duration"):
            await register_service("auth", 8000, address="h")

    async def test_deregister(
        self, fake_consul: FakeConsul, caplog: pytest.LogCaptureFixture
    ) -> None:
        reg = await register_service("auth", 8000, address="10.0.0.5")
        assert reg is not None
        await reg.deregister()
        assert fake_consul.instances == {}
        [(_, path, _, _)] = fake_consul.calls("PUT", "/v1/agent/service/deregister/")
        assert path == "/v1/agent/service/deregister/auth-10.0.0.5-8000"

        # Best effort: an unknown id or an unreachable Consul only logs.
        with caplog.at_level(logging.WARNING, logger="common.discovery"):
            await reg.deregister()
            fake_consul.stop()
            await reg.deregister()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.service_id for r in warnings] == [reg.service_id] * 2


class TestResolver:
    async def test_round_robin(self, fake_consul: FakeConsul) -> None:
        fake_consul.add("auth", "auth-a", "10.0.0.1", 8000)
        fake_consul.add("auth", "auth-b", "10.0.0.2", 8001)
        fake_consul.add("storage", "storage-a", "10.0.0.3", 9000)
        resolver = ServiceResolver()
        urls = [await resolver.base_url("auth", "http://unused") for _ in range(4)]
        assert set(urls[:2]) == {"http://10.0.0.1:8000", "http://10.0.0.2:8001"}
        assert urls[2:] == urls[:2]
        # Served from the cache within the ttl; Consul was asked for passing instances only.
        [(_, path, query, _)] = fake_consul.calls("GET", "/v1/health/service/")
        assert path == "/v1/health/service/auth"
        assert "passing" in query

    async def test_only_passing(self, fake_consul: FakeConsul) -> None:
        fake_consul.add("auth", "auth-ok", "10.0.0.1", 8000)
        fake_consul.add("auth", "auth-critical", "10.0.0.2", 8000, status="critical")
        fake_consul.add("auth", "auth-warning", "10.0.0.3", 8000, status="warning")
        resolver = ServiceResolver(ttl=0)
        urls = {await resolver.base_url("auth", "http://unused") for _ in range(6)}
        assert urls == {"http://10.0.0.1:8000"}

    async def test_node_address_when_service_has_none(self, fake_consul: FakeConsul) -> None:
        fake_consul.add("auth", "auth-a", "", 8000, node={"Node": "n1", "Address": "10.9.9.9"})
        assert await ServiceResolver().base_url("auth", "http://unused") == "http://10.9.9.9:8000"

    async def test_refreshes_after_ttl(self, fake_consul: FakeConsul) -> None:
        fake_consul.add("auth", "auth-a", "10.0.0.1", 8000)
        resolver = ServiceResolver(ttl=0)
        assert await resolver.base_url("auth", "x") == "http://10.0.0.1:8000"
        fake_consul.deregister("auth-a")
        fake_consul.add("auth", "auth-b", "10.0.0.2", 8000)
        assert await resolver.base_url("auth", "x") == "http://10.0.0.2:8000"

    async def test_no_healthy_instance(self, fake_consul: FakeConsul) -> None:
        fake_consul.add("auth", "auth-a", "10.0.0.1", 8000, status="critical")
        with pytest.raises(NoHealthyInstance, match="'auth'"):
            await ServiceResolver().base_url("auth", "http://unused")

    async def test_registered_instance_found_once_passing(self, fake_consul: FakeConsul) -> None:
        await register_service("auth", 8000, address="10.0.0.7")
        resolver = ServiceResolver()
        with pytest.raises(NoHealthyInstance):  # its first check has not passed yet
            await resolver.base_url("auth", "http://unused")
        fake_consul.instances["auth-10.0.0.7-8000"].status = "passing"
        assert await resolver.base_url("auth", "http://unused") == "http://10.0.0.7:8000"

    async def test_consul_down_uses_last_known(
        self, fake_consul: FakeConsul, caplog: pytest.LogCaptureFixture
    ) -> None:
        fake_consul.add("auth", "auth-a", "10.0.0.1", 8000)
        fake_consul.add("auth", "auth-b", "10.0.0.2", 8000)
        resolver = ServiceResolver(ttl=0)  # every call goes to Consul while it answers
        first = await resolver.base_url("auth", "http://unused")
        fake_consul.stop()
        with caplog.at_level(logging.WARNING, logger="common.discovery"):
            second = await resolver.base_url("auth", "http://unused")
        assert {first, second} == {"http://10.0.0.1:8000", "http://10.0.0.2:8000"}
        assert any(getattr(r, "service", None) == "auth" for r in caplog.records)

    async def test_consul_down_without_cache(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{_closed_port()}")
        with pytest.raises(NoHealthyInstance, match=r"'auth'.*unreachable"):
            await ServiceResolver().base_url("auth", "http://unused")
