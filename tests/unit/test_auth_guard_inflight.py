"""AuthGuard counts an attempt before its check (issue 18, item 4)."""

from __future__ import annotations

from postillon.core.clock import FakeClock
from postillon.inbound.auth import AuthGuard
from postillon.inbound.limits import ConnectionLimiter


def test_attempts_in_flight_and_failures_share_the_budget() -> None:
    guard = AuthGuard(FakeClock(1000.0), max_failures=3)
    assert [guard.begin("192.0.2.1") for _ in range(4)] == [None, None, None, "busy"]
    guard.release("192.0.2.1")  # a success gives its slot back
    assert guard.begin("192.0.2.1") is None
    for _ in range(3):  # three failures: release, then count
        guard.release("192.0.2.1")
        guard.failure("192.0.2.1")
    assert guard.in_flight("192.0.2.1") == 0
    assert guard.begin("192.0.2.1") == "blocked"
    assert guard.begin("192.0.2.2") is None  # another client is not affected


def test_an_ipv6_slash_64_is_one_client_for_the_guard_and_the_connection_limit() -> None:
    guard = AuthGuard(FakeClock(1000.0), max_failures=1)
    assert guard.begin("2001:db8:1:2::1") is None
    assert guard.begin("2001:db8:1:2::ffff") == "busy"
    assert guard.begin("2001:db8:1:3::1") is None
    limiter = ConnectionLimiter(total=10, per_ip=1)
    assert limiter.try_acquire("2001:db8:1:2::1") is None
    assert limiter.try_acquire("2001:db8:1:2::ffff") is not None
    assert limiter.try_acquire("2001:db8:1:3::1") is None
    limiter.release("2001:db8:1:2::1")
    assert limiter.try_acquire("2001:db8:1:2::ffff") is None
