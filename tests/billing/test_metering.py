"""Per-second metering: the provider's clock, overruled by the platform's when it claims more."""

from datetime import UTC, datetime, timedelta

from billing.metering import meter

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(provider: tuple[float, float] | None, platform: tuple[float, float] | None, **kw):  # type: ignore[no-untyped-def]
    return meter(
        started_at=at(provider[0]) if provider else None,
        ended_at=at(provider[1]) if provider else None,
        started_seen_at=at(platform[0]) if platform else None,
        ended_seen_at=at(platform[1]) if platform else None,
        max_duration_s=kw.get("max_duration_s", 3600),
        tolerance_s=kw.get("tolerance_s", 10),
    )


def test_the_providers_time_is_billed_in_started_seconds() -> None:
    m = run((0, 100.2), (0.1, 130))  # the window also covers the upload of outputs
    assert (m.clock, m.billed_seconds, m.provider_seconds) == ("provider", 101, 100.2)


def test_whole_seconds_are_not_rounded_up_by_float_noise() -> None:
    assert run((0, 100.0000001), (0, 100)).billed_seconds == 100


def test_a_claim_beyond_the_platforms_window_is_overruled() -> None:
    m = run((0, 1000), (0, 100))
    assert (m.clock, m.billed_seconds, m.platform_seconds) == ("platform", 100, 100)


def test_a_claim_within_the_tolerance_stands() -> None:
    m = run((0, 109), (0, 100))
    assert (m.clock, m.billed_seconds) == ("provider", 109)


def test_without_the_daemons_times_the_platforms_window_is_billed() -> None:
    m = run(None, (5, 65))
    assert (m.clock, m.billed_seconds) == ("platform", 60)


def test_a_backwards_clock_is_not_believed() -> None:
    m = run((100, 50), (0, 40))
    assert (m.clock, m.billed_seconds) == ("platform", 40)


def test_never_more_than_the_time_limit() -> None:
    assert run((0, 4000), (0, 4000), max_duration_s=3600).billed_seconds == 3600


def test_nothing_known_bills_nothing() -> None:
    m = run(None, None)
    assert (m.clock, m.billed_seconds) == ("none", 0)
