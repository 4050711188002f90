from common.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    http_host: str = "127.0.0.1"
    http_port: int = 8004
    # A placement pass runs at least this often, and at once on a new job or freed GPUs.
    placement_interval_s: float = 2.0
    placement_batch: int = 200
    # Scoring among matching machines, as an effective price in $/GPU-hour (lower wins):
    # price_weight x price + reliability_weight x (1 - reliability)
    #   + packing_weight x (share of the machine left free after placing).
    # The defaults rank by price first, then reliability, then packing.
    score_price_weight: float = 1.0
    score_reliability_weight: float = 0.5
    score_packing_weight: float = 0.05
    # Simulated GPUs serve only dev-mode platforms; real jobs never land on them otherwise.
    allow_simulated: bool | None = None

    @property
    def simulated_allowed(self) -> bool:
        return self.dev_mode if self.allow_simulated is None else self.allow_simulated
