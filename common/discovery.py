"""Service registration and discovery through Consul; everything is off when CONSUL_HTTP_ADDR
is unset, so a single-host dev stack runs on fixed URLs.

py-consul's asyncio client needs aiohttp (its `asyncio` extra, which we don't install), so its
synchronous client runs in worker threads: callers' event loops never block on Consul.
"""

import asyncio
import itertools
import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass, field

import consul
import requests

log = logging.getLogger(__name__)

CHECK_INTERVAL = "5s"
CHECK_TIMEOUT = "2s"
# Consul drops an instance whose check stays critical this long, e.g. after a crash.
DEREGISTER_AFTER = "1m"
REGISTER_TIMEOUT = 5.0  # seconds per call to the agent
# Every instance carries it: Prometheus scrapes the Consul services with this tag.
SERVICE_TAG = "gpumarket"

_DEFAULT_PORTS = {"http": 80, "https": 443}
# py-consul raises its own errors for HTTP statuses, and lets requests' through (refused, timeout).
_CONSUL_ERRORS = (consul.ConsulException, requests.RequestException)


def consul_name(service: str) -> str:
    """The name a service registers under: Consul names are DNS labels, no underscores."""
    return service.replace("_", "-")


class RegistrationFailed(Exception):
    """Consul refused or could not be asked to register this instance."""


class NoHealthyInstance(Exception):
    def __init__(self, service: str, reason: str = "") -> None:
        super().__init__(f"no healthy instance of {service!r} in Consul{reason}")
        self.service = service


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address() -> tuple[str, str, int] | None:
    raw = os.environ.get("CONSUL_HTTP_ADDR", "").strip()
    if not raw:
        return None
    url = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    if url.scheme not in _DEFAULT_PORTS or not url.hostname:
        raise ValueError(f"CONSUL_HTTP_ADDR={raw!r}: expected host:port or http(s)://host:port")
    # Like Consul's Go client: an address without a port means the scheme's default port.
    return url.scheme, url.hostname, url.port or _DEFAULT_PORTS[url.scheme]


def consul_address() -> str | None:
    """CONSUL_HTTP_ADDR (`host:port`, `http://host:port` or `https://host:port`) as a base URL;
    None when it is unset or empty."""
    parsed = _parse_address()
    if parsed is None:
        return None
    scheme, host, port = parsed
    return f"{scheme}://{_host_port(host, port)}"


def _client(timeout: float) -> consul.Consul | None:
    parsed = _parse_address()
    if parsed is None:
        return None
    scheme, host, port = parsed
    return consul.Consul(
        host=f"[{host}]" if ":" in host else host,
        port=port,
        scheme=scheme,
        token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
        connections_timeout=timeout,
    )


@dataclass
class Registration:
    """A service instance registered with the local Consul agent."""

    service_id: str
    name: str
    address: str
    port: int
    _client: consul.Consul = field(repr=False)

    async def deregister(self) -> None:
        """Best effort: on failure Consul still reaps the instance once its check has been
        critical for DEREGISTER_AFTER, so shutdown should not fail over it."""
        fields = {"service": self.name, "service_id": self.service_id}
        try:
            found = await asyncio.to_thread(self._client.agent.service.deregister, self.service_id)
        except _CONSUL_ERRORS as exc:
            log.warning("consul deregistration failed", extra={**fields, "error": str(exc)})
            return
        if found:
            log.info("deregistered from consul", extra=fields)
        else:
            log.warning("consul did not know this service instance", extra=fields)


def _own_address() -> str:
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return hostname


async def register_service(name: str, port: int, address: str | None = None) -> Registration | None:
    """Registers this instance (id `name-address-port`) with an HTTP check on /healthz.

    `address` is what other services and Consul's check connect to; it defaults to the
    address the hostname resolves to (in a container: the container's own address, which
    stays unique when a service runs several replicas). Returns None when Consul isn't configured;
    raises RegistrationFailed when Consul is configured but the registration fails.
    """
    client = _client(REGISTER_TIMEOUT)
    if client is None:
        return None
    address = address or _own_address()
    service_id = f"{name}-{address}-{port}"
    check = consul.Check.http(
        f"http://{_host_port(address, port)}/healthz",
        CHECK_INTERVAL,
        timeout=CHECK_TIMEOUT,
        deregister=DEREGISTER_AFTER,
    )
    try:
        ok = await asyncio.to_thread(
            client.agent.service.register,
            name,
            service_id=service_id,
            address=address,
            port=port,
            tags=[SERVICE_TAG],
            check=check,
            # A restarted instance re-registers under the same id without piling up checks.
            replace_existing_checks=True,
        )
    except _CONSUL_ERRORS as exc:
        raise RegistrationFailed(
            f"could not register {service_id} with Consul at {consul_address()}: {exc}"
        ) from exc
    if not ok:
        raise RegistrationFailed(f"Consul at {consul_address()} did not register {service_id}")
    log.info(
        "registered with consul",
        extra={"service": name, "service_id": service_id, "address": address, "port": port},
    )
    return Registration(service_id, name, address, port, client)


@dataclass
class _Instances:
    urls: list[str]
    fetched_at: float


class ServiceResolver:
    """Base URLs of a service's healthy instances, round-robin, from Consul's health API.

    Answers are cached for `ttl` seconds; while Consul is unreachable the last answer is used.
    """

    def __init__(self, ttl: float = 5.0, timeout: float = 2.0) -> None:
        self.ttl = ttl
        self._client = _client(timeout)
        self._cache: dict[str, _Instances] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def base_url(self, name: str, fallback: str) -> str:
        """`http://host:port` of the next healthy instance of `name`, or `fallback` unchanged
        when Consul isn't configured. Raises NoHealthyInstance when there is none."""
        if self._client is None:
            return fallback
        urls = await self._instances(name)
        if not urls:
            raise NoHealthyInstance(name)
        return urls[next(self._turns.setdefault(name, itertools.count())) % len(urls)]

    async def _instances(self, name: str) -> list[str]:
        # One lookup per service at a time: concurrent callers wait for it instead of piling on.
        async with self._locks.setdefault(name, asyncio.Lock()):
            cached = self._cache.get(name)
            now = time.monotonic()
            # An empty answer is not reused: a service that just started should be found at once.
            if cached and cached.urls and now - cached.fetched_at < self.ttl:
                return cached.urls
            try:
                _, entries = await asyncio.to_thread(
                    self._client.health.service,  # type: ignore[union-attr]
                    name,
                    passing=True,
                )
            except _CONSUL_ERRORS as exc:
                if cached is None:
                    raise NoHealthyInstance(name, f" (Consul unreachable: {exc})") from exc
                log.warning(
                    "consul unreachable, using last known instances",
                    extra={"service": name, "instances": len(cached.urls), "error": str(exc)},
                )
                cached.fetched_at = now  # retry Consul after ttl, not on every call
                return cached.urls
            urls = [_instance_url(entry) for entry in entries or []]
            self._cache[name] = _Instances(urls, now)
            return urls


def _instance_url(entry: dict) -> str:
    # Service.Address is empty when the instance registered without one: then it is the node's.
    host = entry["Service"]["Address"] or entry["Node"]["Address"]
    return f"http://{_host_port(host, entry['Service']['Port'])}"
