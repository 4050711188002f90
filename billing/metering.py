"""Per-second metering of one container run, the provider's clock checked by the platform's."""

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Clock = Literal["provider", "platform", "none"]


@dataclass(frozen=True)
class Metered:
    provider_seconds: float | None
    platform_seconds: float | None
    clock: Clock
    billed_seconds: int


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def meter(
    *,
    started_at: datetime | None,
    ended_at: datetime | None,
    started_seen_at: datetime | None,
    ended_seen_at: datetime | None,
    max_duration_s: int,
    tolerance_s: float,
) -> Metered:
    """Billable whole seconds from container start to container end.

    `started_at`/`ended_at` are the daemon's times for the container; `*_seen_at` are
    when the platform received the daemon's `started` and `finished` events (JetStream's
    clock). The container ran inside that window, so a provider claiming more than the
    window (plus `tolerance_s` for delivery delays) is overruled by it. The window also
    covers the upload of outputs, which is not billed, so a claim shorter than the window
    is the provider's to make. Never more than max_duration_s.
    """
    provider = _seconds(started_at, ended_at)
    platform = _seconds(started_seen_at, ended_seen_at)
    if provider is not None and provider >= 0:
        if platform is not None and provider > max(platform, 0) + tolerance_s:
            return _billed(provider, max(platform, 0), "platform", max_duration_s)
        return _billed(provider, platform, "provider", max_duration_s)
    if platform is not None and platform >= 0:
        return _billed(provider, platform, "platform", max_duration_s)
    return Metered(provider, platform, "none", 0)


def _billed(
    provider: float | None, platform: float | None, clock: Clock, max_duration_s: int
) -> Metered:
    chosen = provider if clock == "provider" else platform
    assert chosen is not None
    # Started seconds count in full; to the millisecond, so float noise adds no second.
    seconds = math.ceil(round(chosen, 3))
    return Metered(provider, platform, clock, min(seconds, max_duration_s))
