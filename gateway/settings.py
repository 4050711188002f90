from pydantic import Field

from billing.settings import BillingSettings


class GatewaySettings(BillingSettings):
    auth_url: str = "http://127.0.0.1:8001"
    storage_url: str = "http://127.0.0.1:8002"
    registry_url: str = "http://127.0.0.1:8003"
    # The NATS address handed to provider daemons at join (may differ from ours).
    public_nats_url: str | None = None
    heartbeat_interval_s: float = 5.0
    # A job array of 1,000 full specs (env, inputs, commands) runs to a few MiB.
    max_request_body_bytes: int = 8 * 1024 * 1024
    # Must stay below auth_service's signing_key_activation_delay_s.
    jwks_max_age_s: float = 30.0
    jwks_refresh_min_interval_s: float = 5.0
    cors_origins: list[str] = []
    # SSE: how often a live stream re-reads the job's status.
    sse_poll_interval_s: float = 0.5
    # Rate limits in the `limits` syntax ("N/second", "N/minute", several with ";").
    # Per client address on register, login and refresh: slows password guessing from one
    # address; auth_service also throttles failures per email, across addresses.
    rate_limit_auth_per_ip: str = "20/minute"
    rate_limit_per_principal: str = "50/second;1200/minute"
    rate_limit_per_agent: str = "50/second"
    # How long an answer of auth_service about a credential is reused (0: ask every
    # time). Revocations through any gateway apply at once; expiries within this.
    auth_cache_ttl_s: float = Field(default=10.0, ge=0)
