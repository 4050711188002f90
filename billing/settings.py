from decimal import Decimal

from pydantic import Field

from common.settings import ServiceSettings


class BillingSettings(ServiceSettings):
    """The money rules; the gateway (holds) and the scheduler (settlement) read them."""

    # The platform's share of every charge; the provider earns the rest.
    platform_fee_rate: Decimal = Field(default=Decimal("0.10"), ge=0, lt=1)
    # A job without max_price_per_gpu_hour is held (and capped) at this price.
    default_max_price_per_gpu_hour: Decimal = Field(default=Decimal("5.00"), gt=0)
    # The provider's reported run time is billed unless it exceeds what the platform's
    # own clock saw (from `started` arriving to `finished` arriving) by more than this.
    metering_tolerance_s: float = Field(default=10.0, ge=0)
