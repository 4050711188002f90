from common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    heartbeat_interval_s: float = 5.0
    # A provider silent for this long goes offline.
    heartbeat_ttl_s: float = 30.0
    heartbeat_flush_interval_s: float = 1.0
    public_nats_url: str | None = None
