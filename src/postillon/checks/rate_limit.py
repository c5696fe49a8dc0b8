"""Rate limits for submission: messages and recipients per user and per client IP.

Each limit is a token bucket per key: it holds at most ``per_hour`` tokens,
refills at ``per_hour / 3600`` tokens a second, and each message (at MAIL
FROM) or recipient (at RCPT, once the recipient is otherwise accepted) takes
one. An empty bucket means the reply below, and the client retries later:

- messages: ``450 4.7.1 Rate limit exceeded for user|IP, try again later``
  (RFC 3463 4.7.1: delivery not authorized, temporary);
- recipients: ``452 4.5.3 Too many recipients, try again later``
  (RFC 5321 §4.5.3.1.10: 452 makes the client send the rest later).

The reply names the kind of limit, not the key; the key is in the returned
decision, for the log.

Memory is bounded: a bucket that has refilled is the same as no bucket, so it
is dropped; beyond ``max_keys`` the least recently used buckets go (a key
evicted that way starts full again: the cost of the bound). IPv6 clients are
counted per /64, as one host usually owns a whole /64 (``core/client.py``: the
key every per-client limit shares). The clock is injected
(``Clock`` protocol); tests move it by hand.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from postillon.core.client import client_key as ip_key
from postillon.core.clock import Clock
from postillon.core.reply import Reply

DEFAULT_MAX_KEYS = 100_000


class TokenBucketLimiter:
    """Token buckets keyed by string; ``per_hour == 0`` means unlimited."""

    def __init__(self, per_hour: int, clock: Clock, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if per_hour < 0 or max_keys < 1:
            raise ValueError("per_hour must be >= 0 and max_keys >= 1")
        self.capacity = float(per_hour)
        self.rate = per_hour / 3600.0
        self.clock = clock
        self.max_keys = max_keys
        # key -> (tokens, time of last update); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def unlimited(self) -> bool:
        return self.capacity == 0

    def available(self, key: str) -> float:
        if self.unlimited:
            return float("inf")
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.capacity
        tokens, last = bucket
        return min(self.capacity, tokens + max(0.0, self.clock.now() - last) * self.rate)

    def can_take(self, key: str, amount: int = 1) -> bool:
        return self.available(key) >= amount

    def take(self, key: str, amount: int = 1) -> bool:
        """Take ``amount`` tokens if there are that many; whether it did."""
        if self.unlimited:
            return True
        tokens = self.available(key)
        if tokens < amount:
            return False
        self._buckets[key] = (tokens - amount, self.clock.now())
        self._buckets.move_to_end(key)
        self._evict()
        return True

    def _evict(self) -> None:
        # Walk from the least recently used end and drop buckets that have
        # refilled (forgetting them changes nothing); stop at the first that
        # has not, so this is cheap per call. Then enforce the hard bound.
        while self._buckets:
            key = next(iter(self._buckets))
            if self.available(key) < self.capacity:
                break
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def prune(self) -> int:
        """Drop every bucket that has refilled; how many. Call now and then (e.g. a timer)."""
        full = [k for k in self._buckets if self.available(k) >= self.capacity]
        for key in full:
            del self._buckets[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class RateLimited:
    """A refusal: the reply for the client, and which limit/key for the log."""

    reply: Reply
    limit: str  # "user messages", "ip messages", "user recipients", "ip recipients"
    key: str

    @property
    def log_reason(self) -> str:
        return f"rate limit ({self.limit}) exceeded for {self.key}"


def message_limited(scope: str) -> Reply:
    return Reply.of(450, "4.7.1", f"Rate limit exceeded for {scope}, try again later")


TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipients, try again later")


class SubmissionRateLimits:
    """The per-user and per-IP limits of ``[submission]``; one instance per server.

    Not thread-safe: call it from the event loop (it is cheap). ``user`` is
    the authenticated username, or None for a session that has not
    authenticated (then only the IP limits apply).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        messages_per_hour: int,
        recipients_per_hour: int,
        ip_messages_per_hour: int,
        ip_recipients_per_hour: int = 0,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.user_messages = TokenBucketLimiter(messages_per_hour, clock, max_keys=max_keys)
        self.user_recipients = TokenBucketLimiter(recipients_per_hour, clock, max_keys=max_keys)
        self.ip_messages = TokenBucketLimiter(ip_messages_per_hour, clock, max_keys=max_keys)
        self.ip_recipients = TokenBucketLimiter(ip_recipients_per_hour, clock, max_keys=max_keys)

    def _take(
        self,
        user: str | None,
        ip: str,
        user_limiter: TokenBucketLimiter,
        ip_limiter: TokenBucketLimiter,
        what: str,
        reply_for: dict[str, Reply],
    ) -> RateLimited | None:
        checks: list[tuple[str, TokenBucketLimiter, str]] = []
        if user is not None:
            checks.append(("user", user_limiter, user.strip().lower()))
        if ip:
            checks.append(("ip", ip_limiter, ip_key(ip)))
        # All or nothing: a refused message must not use up the other bucket.
        for scope, limiter, key in checks:
            if not limiter.can_take(key):
                return RateLimited(reply_for[scope], f"{scope} {what}", key)
        for _scope, limiter, key in checks:
            limiter.take(key)
        return None

    def check_message(self, user: str | None, ip: str) -> RateLimited | None:
        """At MAIL FROM: count one message; None = go on, else refuse with ``.reply``."""
        return self._take(
            user,
            ip,
            self.user_messages,
            self.ip_messages,
            "messages",
            {"user": message_limited("user"), "ip": message_limited("IP address")},
        )

    def check_recipient(self, user: str | None, ip: str) -> RateLimited | None:
        """At RCPT, after the recipient is otherwise accepted: count one recipient."""
        return self._take(
            user,
            ip,
            self.user_recipients,
            self.ip_recipients,
            "recipients",
            {"user": TOO_MANY_RECIPIENTS, "ip": TOO_MANY_RECIPIENTS},
        )

    def prune(self) -> int:
        return sum(
            lim.prune()
            for lim in (
                self.user_messages,
                self.user_recipients,
                self.ip_messages,
                self.ip_recipients,
            )
        )
