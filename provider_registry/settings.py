from common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    heartbeat_interval_s: float = 5.0
    # A provider silent for this long goes offline and a provider.lost event goes out.
    heartbeat_ttl_s: float = 30.0
    # Short, so a heartbeat is in Postgres well within a second of being sent.
    heartbeat_flush_interval_s: float = 0.25
    liveness_sweep_interval_s: float = 5.0
    reliability_window_days: int = 7
    reliability_interval_s: float = 60.0
    fleet_metrics_interval_s: float = 10.0
    public_nats_url: str | None = None
