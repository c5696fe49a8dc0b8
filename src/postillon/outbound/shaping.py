"""Traffic shaping and adaptive backoff for outbound SMTP (docs/shaping.md).

Design note
-----------
Large receivers throttle senders that connect too often or send too fast, and
say so with ``421``/``4.7.x``. The ``Shaper`` sits between the SMTP transport
and the network and applies, per delivery:

* **the rule**: the first ``[[shaping]]`` rule that matches (``mx:.suffix`` on
  an MX host name, ``domain:`` on the recipient domain, ``*``). An ``mx:`` rule
  makes every domain at that provider one *destination*; otherwise the
  destination is the recipient domain (the next-hop host for a route).
* **suspension** (``admit``): a suspended destination gets no new connection;
  its messages are deferred *without counting an attempt* until the suspension
  ends (``TempFail(attempted=False, retry_after=...)``).
* **message rate** (``admit``): a token bucket per destination
  (``store.shaping.take``: one bucket for the whole cluster on PostgreSQL). A
  token less than ``TOKEN_WAIT`` away is waited for; a later one defers the
  message, not attempted, until about then.
* **connections per destination IP and connect rate** (``connection``): a slot
  per IP held for the life of the connection (idle pooled ones included, since
  a pooled connection is only made when none was idle), and a token of the
  IP's connect-rate bucket per new connection. No slot or token within
  ``TOKEN_WAIT`` raises ``ShapingBusy``: the transport tries the next address,
  and a delivery that found every address busy is deferred, not attempted.
* **feedback** (``observe``): a ``421``, or ``[backoff] burst`` 4xx replies to
  the greeting, EHLO or MAIL within ``window`` seconds, suspend the destination
  for ``initial`` seconds, doubling with each suspension in a row up to
  ``maximum`` (a row ends ``forget_after`` seconds after the last one).
  So does a delivery that reached no address at all (``unreachable``: Postfix's
  dead destination); the runner then postpones the destination's other due
  records in bulk (delivery/postpone.py) instead of trying each.
  Replies to RCPT (greylisting, a full mailbox) say nothing about the sender.

Suspensions live in the store (``suspensions`` table), so the CLI and the admin
API can set and lift them while the server runs and every node honours them;
each process re-reads them every ``REFRESH`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from postillon.config.model import BackoffConfig, ShapingRule
from postillon.core.outcome import TempFail
from postillon.core.reply import Reply
from postillon.outbound.session_types import SessionError, TransactionResult
from postillon.queue.shaping_state import ShapingState, Suspension

log = logging.getLogger("postillon.shaping")

# How long a delivery waits for a rate token or a connection slot before it is
# deferred instead (a waiting delivery holds a place in the runner's active set).
TOKEN_WAIT = 1.0
# How often each process re-reads the suspensions (set by the CLI or another node).
REFRESH = 2.0
SHAPING_STATUS = "4.4.5"
# The reason of a dead-destination suspension starts so: ``queue flush`` (and an
# operator's retry of a message) lifts those, as Postfix's flush revives dead sites.
UNREACHABLE = "unreachable: "


class ShapingBusy(SessionError):
    """No connection slot or connect token for this address within TOKEN_WAIT."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, status=SHAPING_STATUS)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Admission:
    """A delivery may go ahead under ``rule`` (None: no rule applies)."""

    destination: str
    rule: ShapingRule | None


def _mx_matches(pattern: str, host: str) -> bool:
    host = host.lower().rstrip(".")
    if pattern.startswith("."):
        return host.endswith(pattern) or host == pattern[1:]
    return host == pattern


def _domain_matches(pattern: str, domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern


def match_rule(
    rules: Sequence[ShapingRule], domain: str, hosts: Sequence[str]
) -> tuple[str, ShapingRule | None]:
    """(the destination, the first rule that matches) for mail to ``domain`` over
    ``hosts`` (its MX hosts, or the route's host)."""
    domain = domain.lower().rstrip(".")
    for rule in rules:
        if rule.match == "*":
            return domain, rule
        kind, _, pattern = rule.match.partition(":")
        if kind == "mx" and any(_mx_matches(pattern, h) for h in hosts):
            return rule.match, rule
        if kind == "domain" and _domain_matches(pattern, domain):
            return domain, rule
    return domain, None


def pushback(
    error: SessionError | None = None, result: TransactionResult | None = None
) -> Reply | None:
    """The reply that says a destination is pushing back, if any: a 421 anywhere in
    the session, or a 4xx to the greeting, EHLO or MAIL (not to RCPT or DATA)."""
    if error is not None:
        if isinstance(error, ShapingBusy):
            return None
        if error.reply is not None and 400 <= error.reply.code < 500:
            return error.reply  # greeting, EHLO, STARTTLS, AUTH or RSET
        result = error.partial
    if result is None:
        return None
    mail = result.mail_reply
    if mail is not None and 400 <= mail.code < 500:
        return mail
    return next((r for r in result.per_recipient if r.code == 421), None)


class Shaper:
    def __init__(
        self,
        rules: Sequence[ShapingRule],
        backoff: BackoffConfig,
        state: ShapingState | None,
        *,
        clock: Callable[[], float] = time.time,
        dead_for: float | None = None,
    ) -> None:
        self.rules = tuple(rules)
        # A dead destination's suspension is no longer than this ([queue] first_retry:
        # its mail would be tried again then anyway, as Postfix's minimal_backoff_time).
        self.dead_for = dead_for
        self.backoff = backoff
        self.state = state
        self.clock = clock
        self._suspended: dict[str, Suspension] = {}
        self._suspending: set[str] = set()  # dead destinations being suspended now
        self._refreshed = -REFRESH
        self._strikes: dict[str, deque[float]] = defaultdict(deque)
        self._slots: dict[str, asyncio.Semaphore] = {}  # connection slots by address
        self._holders: dict[str, int] = {}  # connections holding a slot, by address

    def rule_for(self, domain: str, host: str) -> tuple[str, ShapingRule | None]:
        return match_rule(self.rules, domain, (host,))

    def sources(self, domain: str, host: str) -> tuple[str, ...] | None:
        """The matching rule's ``source`` pool (connector.SourceRules), or None for
        the global ``[outbound] source_addresses``."""
        _, rule = self.rule_for(domain, host)
        return rule.source if rule is not None and rule.source else None

    # -- suspensions -----------------------------------------------------------
    async def _refresh(self, now: float) -> None:
        if self.state is None or now - self._refreshed < REFRESH:
            return
        self._refreshed = now
        try:
            current = await self.state.suspensions(now)
        except Exception:  # the store is down: keep what we knew
            log.debug("reading suspensions failed", exc_info=True)
            return
        self._suspended = {s.destination: s for s in current}

    async def suspension(self, destination: str, known_since: float = 0.0) -> Suspension | None:
        """``destination``'s running suspension. ``known_since``: re-read the store
        first if this process last read it before then (a record claimed after an
        operator's flush lifted a suspension must see it lifted)."""
        now = self.clock()
        await self._refresh(now)
        found = self._suspended.get(destination)
        if found is not None and found.until > now and self._refreshed < known_since:
            self._refreshed = -REFRESH
            await self._refresh(now)
            found = self._suspended.get(destination)
        return found if found is not None and found.until > now else None

    async def suspend(
        self, destination: str, reason: str, longest: float | None = None
    ) -> Suspension:
        """Suspend ``destination`` for the next interval of its row (``longest`` at most)."""
        now = self.clock()
        backoff = self.backoff
        last = None
        if self.state is not None:
            try:
                last = await self.state.last_suspension(destination)
            except Exception:
                log.debug("reading the last suspension failed", exc_info=True)
        level = 1
        if last is not None and last.until > now - backoff.forget_after:
            level = last.level + 1
        seconds = min(backoff.initial * 2 ** min(level - 1, 30), backoff.maximum)
        if longest is not None:
            seconds = min(seconds, longest)
        suspension = Suspension(destination, now, now + seconds, reason[:300], level, False)
        self._suspended[destination] = suspension
        if self.state is not None:
            try:
                await self.state.suspend(suspension)
            except Exception:  # kept in this process at least
                log.warning("could not store the suspension of %s", destination, exc_info=True)
        log.warning(
            "suspending deliveries to %s for %.0f s (suspension %d in a row): %s",
            destination,
            seconds,
            level,
            reason,
        )
        return suspension

    # -- admission -------------------------------------------------------------
    async def admit(
        self, domain: str, hosts: Sequence[str], next_hop: str = "", known_since: float = 0.0
    ) -> Admission | TempFail:
        """May a message to ``domain`` (over ``hosts``, to ``next_hop``: see
        ``unreachable``), claimed at ``known_since``, go now? Waits up to TOKEN_WAIT
        for a rate token; else the deferral (not attempted) and when to come back."""
        destination, rule = match_rule(self.rules, domain, hosts)
        suspended = await self.suspension(destination, known_since)
        if suspended is None and next_hop and next_hop != destination:
            suspended = await self.suspension(next_hop, known_since)
        if suspended is not None:
            destination = suspended.destination
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(suspended.until))
            reply = Reply.of(
                451,
                SHAPING_STATUS,
                f"Deliveries to {destination} suspended until {until} UTC: {suspended.reason}"[
                    :400
                ],
            )
            return TempFail(
                reply,
                destination,
                attempted=False,
                retry_after=suspended.until - self.clock(),
                suspended=True,
            )
        rate = rule.messages_per_second if rule is not None else None
        if rate is not None and self.state is not None:
            grant = await self.state.take(
                f"rate:{destination}", rate=rate, burst=1.0, now=self.clock(), max_wait=TOKEN_WAIT
            )
            if not grant.granted:
                reply = Reply.of(
                    451, SHAPING_STATUS, f"Message rate to {destination} reached; will retry"
                )
                return TempFail(reply, destination, attempted=False, retry_after=grant.wait)
            if grant.wait > 0:
                await asyncio.sleep(grant.wait)
        return Admission(destination, rule)

    async def connection(self, domain: str, host: str, address: str) -> Callable[[], None]:
        """A connection slot to ``address`` under its rule, and a connect-rate token;
        returns the release (call it once, when the connection closes). Raises
        ShapingBusy when neither comes within TOKEN_WAIT."""
        destination, rule = self.rule_for(domain, host)
        if rule is None or not address:
            return self._not_suspended(destination, _nothing)
        release = _nothing
        if rule.connections is not None:
            slot = self._slots.get(address)
            if slot is None:
                slot = self._slots[address] = asyncio.Semaphore(rule.connections)
            try:
                async with asyncio.timeout(TOKEN_WAIT):
                    await slot.acquire()
            except TimeoutError:
                raise ShapingBusy(
                    f"all {rule.connections} connections to {address} in use", TOKEN_WAIT
                ) from None
            self._holders[address] = self._holders.get(address, 0) + 1
            release = _once(functools.partial(self._release_slot, address, slot))
        rate = rule.connects_per_second
        if rate is not None and self.state is not None:
            grant = await self.state.take(
                f"connect:{address}", rate=rate, burst=1.0, now=self.clock(), max_wait=TOKEN_WAIT
            )
            if not grant.granted:
                release()
                raise ShapingBusy(f"connect rate to {address} reached", grant.wait)
            if grant.wait > 0:
                await asyncio.sleep(grant.wait)
        return self._not_suspended(destination, release)

    def _release_slot(self, address: str, slot: asyncio.Semaphore) -> None:
        slot.release()
        held = self._holders.get(address, 1) - 1
        if held > 0:
            self._holders[address] = held
            return
        # Nobody holds (so nobody waits for) this address's slots: forget them, so a
        # server that met a million addresses does not keep a million semaphores.
        self._holders.pop(address, None)
        if self._slots.get(address) is slot:
            del self._slots[address]

    def _not_suspended(self, destination: str, release: Callable[[], None]) -> Callable[[], None]:
        """``release``, unless the destination was suspended while this delivery
        waited for its slot or token (then no new connection: ShapingBusy)."""
        current = self._suspended.get(destination)
        now = self.clock()
        if current is not None and current.until > now:
            release()
            raise ShapingBusy(f"deliveries to {destination} suspended", current.until - now)
        return release

    async def opened(
        self, domain: str, host: str, address: str, opening: Coroutine[Any, Any, S]
    ) -> S:
        """Await ``opening`` (a connect) inside a connection slot (``connection``);
        the slot goes back when the connection closes (its ``on_close``)."""
        try:
            release = await self.connection(domain, host, address)
        except BaseException:
            opening.close()
            raise
        try:
            session = await opening
        except BaseException:
            release()
            raise
        session.on_close = chained(release, session.on_close)
        return session

    def messages_per_connection(self, domain: str, host: str) -> int | None:
        _, rule = self.rule_for(domain, host)
        return rule.messages_per_connection if rule is not None else None

    # -- feedback --------------------------------------------------------------
    async def unreachable(self, next_hop: str, reason: str) -> None:
        """No address of ``next_hop`` accepted a connection (refused, unreachable,
        timed out): suspend it, as Postfix marks a dead destination ("delivery
        temporarily suspended"), so that its other queued mail is not tried one
        connection at a time while other destinations wait (``[backoff] unreachable``).
        ``next_hop`` is ``targets.next_hop``: the MX domain, or a route's host:port (two
        routes to one host on different ports are two next hops)."""
        if not (self.backoff.enabled and self.backoff.unreachable):
            return
        destination = next_hop
        current = self._suspended.get(destination)
        if destination in self._suspending or (
            current is not None and current.until > self.clock()
        ):
            return  # the deliveries that raced the first failure
        self._suspending.add(destination)
        try:
            await self.suspend(destination, UNREACHABLE + reason, self.dead_for)
        finally:
            self._suspending.discard(destination)

    async def observe(
        self,
        domain: str,
        host: str,
        error: SessionError | None = None,
        result: TransactionResult | None = None,
    ) -> None:
        """Learn from one session's replies (see ``pushback``)."""
        if not self.backoff.enabled:
            return
        reply = pushback(error, result)
        if reply is None:
            return
        destination, _ = self.rule_for(domain, host)
        current = self._suspended.get(destination)
        if current is not None and current.until > self.clock():
            return  # a delivery that started before the suspension met the same refusal
        text = f"{host} said {reply.code} {' '.join(reply.lines)}"
        if reply.code == 421:
            await self.suspend(destination, text)
            return
        now = self.clock()
        strikes = self._strikes[destination]
        strikes.append(now)
        while strikes and strikes[0] < now - self.backoff.window:
            strikes.popleft()
        if len(strikes) >= self.backoff.burst:
            strikes.clear()
            await self.suspend(destination, f"{self.backoff.burst} x 4xx, last: {text}")


class _Closable(Protocol):
    on_close: Callable[[], None] | None


S = TypeVar("S", bound=_Closable)


def all_busy(errors: Sequence[SessionError], detail: str) -> TempFail | None:
    """The deferral (not attempted) when every address was refused by shaping."""
    busy = [e for e in errors if isinstance(e, ShapingBusy)]
    if not busy or len(busy) != len(errors):
        return None
    reply = Reply.of(451, SHAPING_STATUS, busy[-1].detail[:400])
    wait = min(e.retry_after for e in busy)
    return TempFail(reply, detail, attempted=False, retry_after=wait)


def chained(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    """``first``, then ``then`` (an ``on_close`` callback added to another)."""
    if then is None:
        return first

    def both() -> None:
        first()
        then()

    return both


def _nothing() -> None:
    return None


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call
