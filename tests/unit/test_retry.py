"""The retry curve (delivery/retry.py), table-driven."""

from __future__ import annotations

import random

import pytest

from postillon.delivery.retry import RetryPolicy

NOW = 1_800_000_000.0
NO_JITTER = RetryPolicy(jitter=0.0)


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [
        (0, 300),  # "no attempt yet" counts as the first
        (1, 300),  # ~5 min after the first failure (Postfix minimal_backoff_time)
        (2, 600),
        (3, 1200),
        (4, 2400),
        (5, 3600),  # capped at an hour
        (6, 3600),
        (50, 3600),
        (10_000, 3600),  # no float overflow for a very old record
    ],
)
def test_default_curve_without_jitter(attempts: int, delay: float) -> None:
    assert NO_JITTER.base_delay(attempts) == delay
    assert NO_JITTER.next_try(attempts, NOW) == NOW + delay


@pytest.mark.parametrize(
    ("policy", "attempts", "delay"),
    [
        (RetryPolicy(first_delay=60, max_delay=60, jitter=0), 1, 60),
        (RetryPolicy(first_delay=60, max_delay=60, jitter=0), 9, 60),
        (RetryPolicy(first_delay=10, backoff=1.0, jitter=0), 7, 10),  # constant
        (RetryPolicy(first_delay=10, backoff=3.0, max_delay=1000, jitter=0), 3, 90),
        (RetryPolicy(first_delay=10, backoff=3.0, max_delay=1000, jitter=0), 5, 810),
        (RetryPolicy(first_delay=10, backoff=3.0, max_delay=1000, jitter=0), 6, 1000),
        (RetryPolicy(first_delay=1.5, backoff=1.5, max_delay=100, jitter=0), 2, 2.25),
    ],
)
def test_other_curves(policy: RetryPolicy, attempts: int, delay: float) -> None:
    assert policy.next_try(attempts, NOW) == pytest.approx(NOW + delay)


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 8, 100])
def test_jitter_stays_within_bounds_and_spreads(attempts: int) -> None:
    policy = RetryPolicy()
    rng = random.Random(attempts)
    base = policy.base_delay(attempts)
    delays = [policy.next_try(attempts, NOW, rng) - NOW for _ in range(2000)]
    assert all(base * 0.8 <= d <= base for d in delays)
    assert max(delays) <= policy.max_delay  # the cap holds with jitter too
    assert max(delays) - min(delays) > base * 0.15  # spread, even at the cap
    assert len(set(delays)) > 1900


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    a = [policy.next_try(n, NOW, random.Random(7)) for n in range(1, 8)]
    b = [policy.next_try(n, NOW, random.Random(7)) for n in range(1, 8)]
    assert a == b


def test_default_rng_still_jitters() -> None:
    policy = RetryPolicy()
    values = {policy.next_try(1, NOW) for _ in range(50)}
    assert len(values) > 1
    assert all(NOW + 240 <= v <= NOW + 300 for v in values)


@pytest.mark.parametrize(
    ("age", "expired"),
    [
        (0, False),
        (86_400, False),
        (5 * 86_400 - 1, False),
        (5 * 86_400, True),  # Postfix maximal_queue_lifetime = 5d
        (30 * 86_400, True),
        (-60, False),  # a clock that stepped back never expires a message early
    ],
)
def test_expired(age: float, expired: bool) -> None:
    assert RetryPolicy().expired(NOW - age, NOW) is expired


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first_delay": 0},
        {"first_delay": -5},
        {"first_delay": 100, "max_delay": 50},
        {"backoff": 0.5},
        {"jitter": -0.1},
        {"jitter": 1.0},
        {"max_lifetime": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_negative_attempts_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().next_try(-1, NOW)


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.first_delay = 1  # type: ignore[misc]
