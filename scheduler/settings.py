from billing.settings import BillingSettings


class SchedulerSettings(BillingSettings):
    http_host: str = "127.0.0.1"
    http_port: int = 8004
    # A placement pass runs at least this often, and at once on a new job or freed GPUs.
    placement_interval_s: float = 2.0
    # Jobs reserved per pass (one transaction), and queued jobs looked at to find them.
    placement_batch: int = 200
    placement_scan: int = 1000
    # The in-memory fleet view is refreshed from changed rows every pass; a full reload
    # this often is the backstop.
    fleet_resync_interval_s: float = 60.0
    # Deadlines: a task its daemon has not accepted, a run past max_duration_s (the
    # daemon enforces it; this is the platform's own clock), a stop nobody confirmed.
    lifecycle_interval_s: float = 5.0
    accept_timeout_s: float = 60.0
    # Accept deadlines are judged only while this replica's view of the events is no
    # further behind than this many messages (a late `accepted` is not a dead daemon).
    events_backlog_limit: int = 500
    # After a small batch of events, wait this long before fetching the next (Linger in
    # worker.py): a job's accepted/started/finished may be seen this much later.
    events_linger_s: float = 0.1
    overdue_grace_s: float = 30.0
    # A finished job still unsettled after this long is settled by the lifecycle sweep.
    settle_after_s: float = 30.0
    stop_resend_s: float = 30.0
    # Backoff before attempt n (n >= 1): retry_backoff_s x 2^(n-1), at most the max.
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 60.0
    # Scoring among matching machines, as an effective price in $/GPU-hour (lower wins):
    # price_weight x price + reliability_weight x (1 - reliability)
    #   + packing_weight x (share of the machine left free after placing).
    # The defaults rank by price first (a cent per GPU-hour outweighs any reliability
    # gap), then reliability (0.01 apart outweighs packing), then packing.
    score_price_weight: float = 1.0
    score_reliability_weight: float = 0.01
    score_packing_weight: float = 0.0001
    # Simulated GPUs serve only dev-mode platforms; real jobs never land on them otherwise.
    allow_simulated: bool | None = None

    @property
    def simulated_allowed(self) -> bool:
        return self.dev_mode if self.allow_simulated is None else self.allow_simulated
