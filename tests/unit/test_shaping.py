"""The pure parts of traffic shaping and priorities: rule matching, rates, what counts
as push-back, the growing suspension interval, MT-PRIORITY (RFC 6710) and the
claim priority of a message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from postillon.config.model import BackoffConfig, Config, ShapingRule
from postillon.config.shaping import parse_rate
from postillon.core.outcome import TempFail
from postillon.core.priority import DSN_PRIORITY, INTERACTIVE_PRIORITY, message_priority
from postillon.core.reply import Reply
from postillon.outbound.session_types import SessionError, TransactionResult
from postillon.outbound.shaping import (
    Admission,
    Shaper,
    ShapingBusy,
    all_busy,
    match_rule,
    pushback,
)
from postillon.protocol.commands import parse_mail
from postillon.protocol.errors import ProtocolError
from postillon.protocol.extensions import ehlo_keywords
from postillon.protocol.settings import ServerSettings
from postillon.queue.shaping_state import MemoryShapingState

RULES = (
    ShapingRule(match="mx:.provider.example", connections=2, rate="300/min"),
    ShapingRule(match="domain:example.org", messages_per_connection=5),
    ShapingRule(match="domain:.sub.test"),
    ShapingRule(match="*", connect_rate="20/min"),
)


@pytest.mark.parametrize(
    ("domain", "hosts", "destination", "index"),
    [
        ("a.test", ["mx1.provider.example"], "mx:.provider.example", 0),
        ("b.test", ["provider.example"], "mx:.provider.example", 0),
        ("b.test", ["xprovider.example"], "b.test", 3),
        ("Example.ORG", ["mx.example.org"], "example.org", 1),
        ("x.sub.test", ["mx.x.sub.test"], "x.sub.test", 2),
        ("sub.test", ["mx.sub.test"], "sub.test", 3),
    ],
)
def test_first_matching_rule_and_its_destination(
    domain: str, hosts: list[str], destination: str, index: int
) -> None:
    assert match_rule(RULES, domain, hosts) == (destination, RULES[index])


def test_no_rule_means_the_domain_alone() -> None:
    assert match_rule(RULES[:1], "a.test", ["mx.a.test"]) == ("a.test", None)


@pytest.mark.parametrize(
    ("text", "per_second"), [("300/min", 5.0), ("2/s", 2.0), ("3600/h", 1.0), ("1.5/sec", 1.5)]
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == per_second


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"match": "host:x"}, "match"),
        ({"match": "mx:"}, "match"),
        ({"match": "*", "rate": "fast"}, "rate"),
        ({"match": "*", "connect_rate": "0/min"}, "connect_rate"),
        ({"match": "*", "connections": 0}, "connections"),
        ({"match": "*", "source": ["out1.example"]}, "source"),
    ],
)
def test_bad_rules_name_the_key(rule: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate({"shaping": [rule]})
    assert key in str(caught.value)


def test_a_rules_source_pool_replaces_the_global_one() -> None:
    """[[shaping]] source = [...] (issue 16 item 3), handed to the connector."""
    rules = (
        ShapingRule(match="mx:.provider.example", source=("127.0.0.6", "127.0.0.7")),
        ShapingRule(match="*", rate="10/s"),
    )
    shaper = Shaper(rules, BackoffConfig(), MemoryShapingState(lambda: None))
    assert shaper.sources("a.test", "mx1.provider.example") == ("127.0.0.6", "127.0.0.7")
    assert shaper.sources("b.test", "mx.b.test") is None  # a rule without source
    assert Shaper((), BackoffConfig(), None).sources("b.test", "mx.b.test") is None


REFUSED_421 = Reply.of(421, "4.7.0", "too many connections")
BUSY_451 = Reply.of(451, "4.7.1", "slow down")
GREYLISTED = Reply.of(450, "4.2.0", "greylisted")
OK = Reply.of(250, "2.0.0", "ok")


def test_pushback_is_a_421_or_a_4xx_to_the_session_or_mail() -> None:
    assert pushback(SessionError("greeting", reply=REFUSED_421)) == REFUSED_421
    assert pushback(result=TransactionResult((BUSY_451,), BUSY_451)) == BUSY_451
    assert pushback(result=TransactionResult((REFUSED_421,), OK)) == REFUSED_421
    # A recipient's greylisting says nothing about the sender.
    assert pushback(result=TransactionResult((GREYLISTED,), OK)) is None
    assert pushback(SessionError("connect failed")) is None
    assert pushback(ShapingBusy("all slots busy", 1.0)) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_421_suspends_for_a_growing_interval_then_lets_go() -> None:
    clock = Clock()
    state = MemoryShapingState()
    shaper = Shaper(RULES, BackoffConfig(initial=60, maximum=200), state, clock=clock)
    error = SessionError("greeting", reply=REFUSED_421)
    await shaper.observe("a.test", "mx1.provider.example", error=error)
    refused = await shaper.admit("other.test", ["mx2.provider.example"])  # same provider
    assert isinstance(refused, TempFail) and not refused.attempted
    assert refused.retry_after == 60 and "421" in str(refused.reply)
    await shaper.observe("a.test", "mx1.provider.example", error=error)  # already suspended
    assert (await state.suspensions(clock.now))[0].level == 1
    clock.now += 61
    assert isinstance(await shaper.admit("a.test", ["mx1.provider.example"]), Admission)
    await shaper.observe("a.test", "mx1.provider.example", error=error)  # again: longer
    (second,) = await state.suspensions(clock.now)
    assert second.level == 2 and second.until - clock.now == 120
    clock.now += 121
    await shaper.observe("a.test", "mx1.provider.example", error=error)
    (third,) = await state.suspensions(clock.now)
    assert third.level == 3 and third.until - clock.now == 200  # the maximum


async def test_a_burst_of_4xx_on_mail_suspends_one_does_not() -> None:
    clock = Clock()
    shaper = Shaper(RULES, BackoffConfig(burst=3, window=60), MemoryShapingState(), clock=clock)
    result = TransactionResult((BUSY_451,), BUSY_451)
    for _ in range(2):
        await shaper.observe("example.org", "mx.example.org", result=result)
        clock.now += 1
    assert isinstance(await shaper.admit("example.org", ["mx.example.org"]), Admission)
    await shaper.observe("example.org", "mx.example.org", result=result)
    assert isinstance(await shaper.admit("example.org", ["mx.example.org"]), TempFail)


async def test_an_unreachable_next_hop_is_suspended_by_itself() -> None:
    """A route's host:port that took no connection is suspended (a dead destination);
    another port of the same host is not."""
    clock = Clock()
    shaper = Shaper((), BackoffConfig(), MemoryShapingState(), clock=clock)
    await shaper.unreachable("127.0.0.1:3111", "connect to 127.0.0.1:3111: Connection refused")
    dead = await shaper.admit("127.0.0.1", ["127.0.0.1"], "127.0.0.1:3111")
    assert isinstance(dead, TempFail) and dead.suspended and not dead.attempted
    assert dead.retry_after == 60.0 and "127.0.0.1:3111" in dead.reply.text
    assert isinstance(await shaper.admit("127.0.0.1", ["127.0.0.1"], "127.0.0.1:2525"), Admission)
    clock.now += 61
    assert isinstance(await shaper.admit("127.0.0.1", ["127.0.0.1"], "127.0.0.1:3111"), Admission)
    short = Shaper((), BackoffConfig(), MemoryShapingState(), clock=clock, dead_for=5.0)
    await short.unreachable("dead.test", "refused")  # never longer than [queue] first_retry
    dead = await short.admit("dead.test", ["mx.dead.test"], "dead.test")
    assert isinstance(dead, TempFail) and dead.retry_after == 5.0
    off = Shaper((), BackoffConfig(unreachable=False), MemoryShapingState(), clock=clock)
    await off.unreachable("dead.test", "refused")
    assert isinstance(await off.admit("dead.test", ["mx.dead.test"], "dead.test"), Admission)


async def test_rate_defers_what_is_too_far_away() -> None:
    clock = Clock()
    rule = ShapingRule(match="*", rate="60/min")  # one a second
    shaper = Shaper((rule,), BackoffConfig(), MemoryShapingState(), clock=clock)
    assert isinstance(await shaper.admit("a.test", ["mx.a.test"]), Admission)  # at once
    assert isinstance(await shaper.admit("a.test", ["mx.a.test"]), Admission)  # waits 1 s
    deferred = await shaper.admit("a.test", ["mx.a.test"])
    assert isinstance(deferred, TempFail) and not deferred.attempted
    assert deferred.retry_after == pytest.approx(1.0)
    assert isinstance(await shaper.admit("b.test", ["mx.b.test"]), Admission)  # its own


async def test_connection_slots_per_address() -> None:
    rule = ShapingRule(match="*", connections=1)
    shaper = Shaper((rule,), BackoffConfig(), MemoryShapingState())
    release = await shaper.connection("a.test", "mx.a.test", "192.0.2.1")
    with pytest.raises(ShapingBusy):
        await shaper.connection("a.test", "mx.a.test", "192.0.2.1")
    other = await shaper.connection("a.test", "mx.a.test", "192.0.2.2")
    release()
    release()  # twice is harmless
    (await shaper.connection("a.test", "mx.a.test", "192.0.2.1"))()
    other()
    busy = all_busy([ShapingBusy("busy", 0.5)], "mx")
    assert busy is not None and not busy.attempted and busy.retry_after == 0.5


@pytest.mark.parametrize(
    ("args", "value"),
    [("", None), (" MT-PRIORITY=3", 3), (" MT-PRIORITY=-9", -9), (" MT-PRIORITY=+2", 2)],
)
def test_mt_priority_on_mail(args: str, value: int | None) -> None:
    settings = ServerSettings("mx.test", mt_priority=True)
    _, params = parse_mail(f"FROM:<a@b.test>{args}", settings)
    assert params.mt_priority == value
    assert "MT-PRIORITY" in ehlo_keywords(settings, tls_active=False)


@pytest.mark.parametrize("value", ["10", "-10", "x", ""])
def test_bad_mt_priority_is_refused(value: str) -> None:
    with pytest.raises(ProtocolError):
        parse_mail(
            f"FROM:<a@b.test> MT-PRIORITY={value}", ServerSettings("mx.test", mt_priority=True)
        )


def test_priority_of_a_message() -> None:
    def p(mt: int | None, source: str = "smtp", auth: bool = False, trusted: bool = False) -> int:
        return message_priority(mt, source=source, authenticated=auth, trusted=trusted)

    assert p(None) == 0
    assert p(5) == 0  # an unknown client's MT-PRIORITY is not honoured
    assert p(5, trusted=True) == 5
    assert p(-5, trusted=True) == -5  # bulk goes behind
    assert p(None, auth=True) == INTERACTIVE_PRIORITY
    assert p(3, auth=True) == INTERACTIVE_PRIORITY + 3
    assert p(None, source="sendmail") == INTERACTIVE_PRIORITY
    assert p(None, source="bounce") == DSN_PRIORITY
