from common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    auth_url: str = "http://127.0.0.1:8001"
    storage_url: str = "http://127.0.0.1:8002"
    registry_url: str = "http://127.0.0.1:8003"
    # The NATS address handed to provider daemons at join (may differ from ours).
    public_nats_url: str | None = None
    heartbeat_interval_s: float = 5.0
    jwks_refresh_min_interval_s: float = 10.0
    cors_origins: list[str] = []
    # SSE: how often a live stream re-reads the job's status.
    sse_poll_interval_s: float = 0.5
