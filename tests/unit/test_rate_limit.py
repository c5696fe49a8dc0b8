"""Rate limits: token buckets with an injected clock; replies; bounded memory."""

from __future__ import annotations

from postillon.checks.rate_limit import (
    TOO_MANY_RECIPIENTS,
    SubmissionRateLimits,
    TokenBucketLimiter,
    ip_key,
)
from postillon.core.clock import FakeClock


def test_bucket_allows_per_hour_then_refills() -> None:
    clock = FakeClock()
    lim = TokenBucketLimiter(3600, clock)  # one token a second
    assert all(lim.take("k") for _ in range(3600))
    assert not lim.take("k")
    clock.advance(1.0)
    assert lim.take("k")
    assert not lim.take("k")
    assert lim.take("other")  # keys are independent


def test_zero_means_unlimited() -> None:
    lim = TokenBucketLimiter(0, FakeClock())
    assert all(lim.take("k") for _ in range(10_000))
    assert len(lim) == 0


def test_refilled_buckets_are_forgotten_and_memory_bounded() -> None:
    clock = FakeClock()
    lim = TokenBucketLimiter(10, clock, max_keys=100)
    for i in range(1000):
        lim.take(f"k{i}")
    assert len(lim) <= 100
    clock.advance(3600)
    lim.prune()
    assert len(lim) == 0
    # Idle buckets at the old end go as new keys arrive, without a prune().
    lim.take("a")
    clock.advance(3600)
    lim.take("b")
    assert len(lim) == 1


def test_ip_key() -> None:
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("2001:db8:1:2:3:4:5:6") == ip_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("unix") == "unix"


def limits(clock: FakeClock, **kw: int) -> SubmissionRateLimits:
    args = {
        "messages_per_hour": 2,
        "recipients_per_hour": 3,
        "ip_messages_per_hour": 5,
    } | kw
    return SubmissionRateLimits(clock, **args)


def test_user_message_limit_reply() -> None:
    lim = limits(FakeClock())
    assert lim.check_message("alice@example.com", "192.0.2.1") is None
    assert lim.check_message("Alice@example.com", "192.0.2.2") is None
    refused = lim.check_message("alice@example.com", "192.0.2.3")
    assert refused is not None
    assert (
        refused.reply.to_bytes() == b"450 4.7.1 Rate limit exceeded for user, try again later\r\n"
    )
    assert refused.key == "alice@example.com" and "user messages" in refused.log_reason
    assert lim.check_message("bob@example.com", "192.0.2.3") is None


def test_ip_message_limit_counts_all_users_and_unauthenticated() -> None:
    lim = limits(FakeClock())
    for user in ("a@x.test", "b@x.test", "c@x.test", None, None):
        assert lim.check_message(user, "198.51.100.7") is None
    refused = lim.check_message("d@x.test", "198.51.100.7")
    assert refused is not None and refused.reply.code == 450
    assert refused.reply.status == "4.7.1" and refused.key == "198.51.100.7"


def test_refused_message_does_not_use_up_the_other_bucket() -> None:
    lim = limits(FakeClock(), ip_messages_per_hour=1)
    assert lim.check_message("a@x.test", "192.0.2.1") is None
    assert lim.check_message("a@x.test", "192.0.2.1") is not None  # ip bucket empty
    # The user's second message was not counted: one left from another IP.
    assert lim.check_message("a@x.test", "192.0.2.2") is None
    assert lim.check_message("a@x.test", "192.0.2.3") is not None


def test_recipient_limit_452_and_recovery() -> None:
    clock = FakeClock()
    lim = limits(clock)
    for _ in range(3):
        assert lim.check_recipient("alice@example.com", "192.0.2.1") is None
    refused = lim.check_recipient("alice@example.com", "192.0.2.1")
    assert refused is not None and refused.reply == TOO_MANY_RECIPIENTS
    assert refused.reply.to_bytes().startswith(b"452 4.5.3 Too many recipients")
    clock.advance(1200)  # 3/hour: one recipient back after 20 minutes
    assert lim.check_recipient("alice@example.com", "192.0.2.1") is None
    assert lim.check_recipient("alice@example.com", "192.0.2.1") is not None


def test_unauthenticated_ip_has_no_recipient_limit_by_default() -> None:
    lim = limits(FakeClock())
    assert all(lim.check_recipient(None, "192.0.2.1") is None for _ in range(100))
