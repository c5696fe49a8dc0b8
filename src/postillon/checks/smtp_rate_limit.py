"""Port-25 rate limits: ``[smtp_rate_limits]``, messages and recipients per client
network and per envelope sender domain, per time window.

At MAIL one message is counted against the client network and the sender domain; at
RCPT one recipient, once it is otherwise accepted (this check runs after the relay
check and greylisting: a refused or greylisted recipient is not counted). Counting
is all or nothing (a refused message uses up neither limit) and happens in the queue
store (``queue/rate_counters.py``), so every node of a cluster counts against the same
limit and a restart starts no new allowance. The
replies are those of the submission limits (``rate_limit.py``): ``450 4.7.1`` for
messages, ``452 4.5.3`` for recipients (RFC 5321 §4.5.3.1.10: the client sends the
rest later). Authenticated clients and ``[relay] trusted_networks`` are not counted.
"""

from __future__ import annotations

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import CONTINUE, Decision, Phase, proceed, reject
from postillon.checks.greylist import client_network
from postillon.checks.parts import PipelineParts
from postillon.checks.rate_limit import TOO_MANY_RECIPIENTS, message_limited
from postillon.config.inbound_filters import SmtpRateLimitsConfig
from postillon.core.clock import Clock
from postillon.queue.store import RateCounterStore, RateRequest

__all__ = ["SmtpRateLimitCheck", "build"]


def _sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower().rstrip(".") if sender else "<>"


class SmtpRateLimitCheck(BaseCheck):
    name = "smtp_rate_limit"
    phases: frozenset[Phase] = frozenset({"mail", "rcpt"})

    def __init__(
        self,
        config: SmtpRateLimitsConfig,
        store: RateCounterStore,
        clock: Clock,
        *,
        dry_run: bool = False,
    ):
        self.config = config
        self.store = store
        self.clock = clock
        self.dry_run = dry_run  # explain --simulate: compare with the counts, take nothing

    def _requests(
        self, s: SessionContext, sender: str, what: str, client_limit: int, domain_limit: int
    ) -> list[tuple[str, RateRequest]]:
        net = client_network(s.client.ip, self.config.ipv4_prefix, self.config.ipv6_prefix)
        window = self.config.window
        wanted = [
            (f"client {net}", f"client-{what}/{net}", client_limit),
            (
                f"sender domain {_sender_domain(sender)}",
                f"domain-{what}/{_sender_domain(sender)}",
                domain_limit,
            ),
        ]
        return [(label, RateRequest(c, window, 1, lim)) for label, c, lim in wanted if lim > 0]

    async def _take(
        self, s: SessionContext, sender: str, what: str, client_limit: int, domain_limit: int
    ) -> tuple[str, str] | None:
        """None if counted (or nothing to count), else (limit label, what it saw)."""
        if s.client.authenticated or s.client.trusted:
            return None
        requests = self._requests(s, sender, what, client_limit, domain_limit)
        if not requests:
            return None
        now = self.clock.now()
        if self.dry_run:
            refused = None
            for i, (_, r) in enumerate(requests):
                if await self.store.used(r.counter, r.window, now) + r.amount > r.limit:
                    refused = i
                    break
        else:
            refused = await self.store.take([r for _, r in requests], now)
        if refused is None:
            return None
        label, request = requests[refused]
        saw = f"{label}: {request.limit} {what} per {request.window}s used up"
        return label, saw

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        c = self.config
        hit = await self._take(
            s, tx.sender, "messages", c.client_messages, c.sender_domain_messages
        )
        if hit is None:
            return (
                CONTINUE if s.client.trusted or s.client.authenticated else proceed("within limits")
            )
        label, saw = hit
        scope = "this client" if label.startswith("client") else "this sender domain"
        return reject(
            message_limited(scope), saw, reason=f"rate limit ({saw})", metric="rate_limit"
        )

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        c = self.config
        hit = await self._take(
            s, tx.sender, "recipients", c.client_recipients, c.sender_domain_recipients
        )
        if hit is None:
            return CONTINUE
        _label, saw = hit
        return reject(TOO_MANY_RECIPIENTS, saw, reason=f"rate limit ({saw})", metric="rate_limit")


def build(kind: ListenerKind, parts: PipelineParts) -> SmtpRateLimitCheck | None:
    config = parts.config.smtp_rate_limits
    if kind != "smtp" or not config.enabled or parts.store is None:
        return None
    rates = parts.store.policy_state.rates
    return SmtpRateLimitCheck(config, rates, parts.clock, dry_run=parts.dry_run)
