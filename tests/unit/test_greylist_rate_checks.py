"""Greylisting and port-25 rate limits as pipeline checks (checks/greylist.py,
checks/smtp_rate_limit.py), composed by ``build_pipeline`` from the config, on the
memory store with a clock moved by hand (the SQL stores run the same contract in
test_store_policy_state.py)."""

from __future__ import annotations

import logging
from dataclasses import replace

from postillon.checks.context import ClientFacts, RecipientFacts, SessionContext, TransactionContext
from postillon.checks.greylist import GreylistCheck, client_network
from postillon.checks.parts import PipelineParts
from postillon.checks.pipeline import Pipeline, build_pipeline
from postillon.checks.relay import RelayPolicy
from postillon.config.inbound_filters import GreylistConfig, SmtpRateLimitsConfig
from postillon.config.model import Config
from postillon.core.clock import FakeClock
from postillon.observability.maillog import MailLog
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import GreylistPolicy, GreylistResult, GreylistStore


def parts(config: Config, clock: FakeClock, store: MemoryStore) -> PipelineParts:
    relay = RelayPolicy.__new__(RelayPolicy)  # not asked: these tests call the checks' phases
    return PipelineParts(config, clock, MailLog(logging.getLogger("test")), relay, store=store)


def only(pipeline: Pipeline, *names: str) -> Pipeline:
    return Pipeline([c for c in pipeline.checks if c.name in names], pipeline.clock)


def s_tx(
    ip: str, sender: str = "a@example.net", **client: object
) -> tuple[SessionContext, TransactionContext]:
    facts = replace(ClientFacts(ip=ip), **client)  # type: ignore[arg-type]
    return SessionContext("S", facts), TransactionContext(sender)


def test_client_networks() -> None:
    assert client_network("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9", 24, 64) == "2001:db8:1:2::/64"
    assert client_network("local", 24, 64) == "local"


async def test_greylist_refuses_the_first_attempt_and_passes_the_retry_from_a_neighbour() -> None:
    clock, store = FakeClock(), MemoryStore()
    config = Config(greylist=GreylistConfig(enabled=True, delay=60, auto_allow_after=0))
    pipeline = only(build_pipeline("smtp", parts(config, clock, store)), "greylist")
    assert [c.name for c in pipeline.checks] == ["greylist"]
    s, tx = s_tx("192.0.2.7")
    first = await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))
    assert first.reply is not None and (first.reply.code, first.reply.status) == (450, "4.7.1")
    assert "Greylisted: please try again in 60 seconds" in first.reply.text
    clock.advance(30)
    assert (await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))).reply is not None
    clock.advance(31)
    s2, tx2 = s_tx("192.0.2.200")  # another address of the same /24
    assert (await pipeline.rcpt(s2, tx2, RecipientFacts("bob@example.org"))).reply is None


class CountingGreylist:
    """The memory store's greylist state, counting the questions asked."""

    def __init__(self, inner: GreylistStore) -> None:
        self.inner = inner
        self.asked: list[str] = []

    async def check(
        self, net: str, sender: str, rcpt: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        self.asked.append(rcpt)
        return await self.inner.check(net, sender, rcpt, now, policy)


async def test_a_pass_is_remembered_for_a_minute_without_asking_the_store() -> None:
    clock, store = FakeClock(), MemoryStore()
    counting = CountingGreylist(store.policy_state.greylist)
    config = GreylistConfig(enabled=True, delay=60, auto_allow_after=0)
    pipeline = Pipeline([GreylistCheck(config, counting, clock)], clock)  # type: ignore[arg-type]
    asked = counting.asked
    s, tx = s_tx("192.0.2.7")
    bob = RecipientFacts("bob@example.org")
    assert (await pipeline.rcpt(s, tx, bob)).reply is not None  # new: greylisted
    clock.advance(61)
    assert (await pipeline.rcpt(s, tx, bob)).reply is None  # passed (the store said so)
    assert len(asked) == 2
    clock.advance(30)
    assert (await pipeline.rcpt(s, tx, RecipientFacts("BOB@example.org"))).reply is None
    assert len(asked) == 2  # remembered: the store was not asked
    other = await pipeline.rcpt(s, tx, RecipientFacts("carol@example.org"))
    assert other.reply is not None and len(asked) == 3  # another triplet is not
    clock.advance(31)  # the memory lapses: the store is asked again, and still passes
    assert (await pipeline.rcpt(s, tx, bob)).reply is None
    assert len(asked) == 4


async def test_greylist_skips_trusted_authenticated_and_dnswl_clients() -> None:
    clock, store = FakeClock(), MemoryStore()
    config = Config(greylist=GreylistConfig(enabled=True))
    pipeline = only(build_pipeline("smtp", parts(config, clock, store)), "greylist")
    for facts in ({"trusted": True}, {"authenticated": True}):
        s, tx = s_tx("192.0.2.7", **facts)
        assert (await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))).reply is None
    s, tx = s_tx("192.0.2.7")
    s.notes["dnswl"] = "list.dnswl.example"
    assert (await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))).reply is None


def test_greylist_is_port_25_only_and_off_by_default() -> None:
    clock, store = FakeClock(), MemoryStore()
    on = Config(greylist=GreylistConfig(enabled=True))
    assert "greylist" not in [
        c.name for c in build_pipeline("submission", parts(on, clock, store)).checks
    ]
    assert "greylist" not in [
        c.name for c in build_pipeline("smtp", parts(Config(), clock, store)).checks
    ]


async def test_rate_limits_per_client_network_and_sender_domain() -> None:
    clock, store = FakeClock(), MemoryStore()
    limits = SmtpRateLimitsConfig(
        window=600, client_messages=2, sender_domain_messages=3, client_recipients=3, ipv4_prefix=24
    )
    pipeline = only(
        build_pipeline("smtp", parts(Config(smtp_rate_limits=limits), clock, store)),
        "smtp_rate_limit",
    )
    for ip in ("192.0.2.1", "192.0.2.2"):  # one /24: one client
        s, tx = s_tx(ip)
        assert (await pipeline.mail(s, tx)).reply is None
    s, tx = s_tx("192.0.2.3")
    refused = await pipeline.mail(s, tx)
    assert refused.reply is not None and (refused.reply.code, refused.reply.status) == (
        450,
        "4.7.1",
    )
    assert "this client" in refused.reply.text
    s, tx = s_tx("198.51.100.1")  # another client, same sender domain: its third message
    assert (await pipeline.mail(s, tx)).reply is None
    s, tx = s_tx("203.0.113.1")
    refused = await pipeline.mail(s, tx)
    assert refused.reply is not None and "this sender domain" in refused.reply.text
    # Recipients: 452 4.5.3 past the limit; a trusted client is not counted.
    s, tx = s_tx("203.0.113.9", sender="x@other.example")
    replies = [await pipeline.rcpt(s, tx, RecipientFacts(f"r{i}@example.org")) for i in range(4)]
    assert [r.reply.code if r.reply else 250 for r in replies] == [250, 250, 250, 452]
    s, tx = s_tx("203.0.113.9", sender="x@other.example", trusted=True)
    assert (await pipeline.rcpt(s, tx, RecipientFacts("r9@example.org"))).reply is None
    # A new window starts a new count.
    clock.advance(600)
    s, tx = s_tx("192.0.2.3")
    assert (await pipeline.mail(s, tx)).reply is None


async def test_dry_run_decides_without_recording() -> None:
    """explain --simulate: greylisting and rate limits answer as they would, and a real
    attempt afterwards is still the first one (nothing recorded, nothing counted)."""
    clock, store = FakeClock(), MemoryStore()
    config = Config(
        greylist=GreylistConfig(enabled=True, delay=60, auto_allow_after=0),
        smtp_rate_limits=SmtpRateLimitsConfig(client_messages=1),
    )
    dry = build_pipeline("smtp", replace(parts(config, clock, store), dry_run=True))
    real = build_pipeline("smtp", parts(config, clock, store))
    dry = only(dry, "greylist", "smtp_rate_limit")
    real = only(real, "greylist", "smtp_rate_limit")
    for _ in range(3):
        s, tx = s_tx("192.0.2.7")
        assert (await dry.mail(s, tx)).reply is None
        refused = await dry.rcpt(s, tx, RecipientFacts("bob@example.org"))
        assert refused.reply is not None and refused.reply.code == 450
    s, tx = s_tx("192.0.2.7")
    assert (await real.mail(s, tx)).reply is None  # the first message counted
    first = await real.rcpt(s, tx, RecipientFacts("bob@example.org"))
    assert first.reply is not None and "60 seconds" in first.reply.text  # a new triplet
    s, tx = s_tx("192.0.2.7")
    assert (await dry.mail(s, tx)).reply is not None  # the dry run sees the real count


async def test_a_greylisted_recipient_is_not_counted() -> None:
    """Greylisting runs before the recipient limit: the refused first attempt uses none
    of the client's allowance, the accepted retry does."""
    clock, store = FakeClock(), MemoryStore()
    config = Config(
        greylist=GreylistConfig(enabled=True, delay=60, auto_allow_after=0),
        smtp_rate_limits=SmtpRateLimitsConfig(client_recipients=1),
    )
    pipeline = only(
        build_pipeline("smtp", parts(config, clock, store)), "greylist", "smtp_rate_limit"
    )
    assert [c.name for c in pipeline.checks] == ["greylist", "smtp_rate_limit"]
    s, tx = s_tx("192.0.2.7")
    first = await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))
    assert first.reply is not None and first.reply.code == 450
    clock.advance(61)
    assert (await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))).reply is None
    third = await pipeline.rcpt(s, tx, RecipientFacts("bob@example.org"))
    assert third.reply is not None and third.reply.code == 452
