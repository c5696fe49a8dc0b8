"""The asyncio driver of one milter connection (the thin adapter over
``protocol.milter.MilterClient``).

``MilterConnection`` is one SMTP session's conversation with one milter: it connects
(TCP or unix socket), negotiates, and for each step sends the command and waits for
the answer with a timeout that ``SMFIR_PROGRESS`` restarts. It never raises for the
milter's sake: a milter that is down, stalls, closes mid-dialogue or sends garbage
makes the step return ``MilterOutcome(failed=...)`` and marks the connection dead;
the check (``milter_check.py``) then applies the milter's ``default_action``.
A connection that ends its session cleanly can serve the next one (``milter_pool.py``,
SMFIC_QUIT_NC); a reused connection that fails before its first answer in the new
session (closed by the milter while idle, reset, garbage, silence) is replaced by a
fresh one and the session's steps so far are sent again, so reuse never costs a
message its verdict.
All waiting is on the event loop (``milter_socket.py``: an asyncio Protocol feeding
the sans-IO client, one future and one timer per awaited answer): a slow milter
delays only its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

from postillon.checks.milter_socket import MilterSocket
from postillon.config.model import parse_milter_address
from postillon.protocol.milter import MilterClient, body_chunks
from postillon.protocol.milter_wire import (
    MilterProtocolError,
    Modification,
    Negotiated,
    Progress,
    ReplaceBody,
    Stage,
    Verdict,
)

log = logging.getLogger("postillon.checks.milter")

# SMFIR_PROGRESS restarts the timeout, but a milter that says "still working" forever
# must not hold a session forever: one step gets at most this many timeouts in all.
PROGRESS_CEILING = 10
# Commands the milter answers not (SMFIP_NR_*, as rspamd asks for nearly every step)
# wait in the client's buffer and go out in one write with the next command that is
# answered (end of message at the latest), or with an abort or quit: a message then costs one
# write instead of one per step (connect, HELO, MAIL, RCPT, DATA, each header, end of
# headers, body). The milter sees the same byte stream; it only sees unanswered steps
# later, and a connection that broke meanwhile is noticed at the next answered step.
# More than this many octets waiting are written at once (a large body streams).
UNANSWERED_BUFFER = 65536
# A replacement body larger than this is garbage, not a filter's work (the default
# is [limits] message_size's default; the check passes the configured one).
DEFAULT_MAX_REPLACEMENT = 52_428_800
# A reused connection keeps the session's steps until its first answer, to send them
# again on a fresh connection if it turns out dead; past this many octets (a large
# body the milter answers nothing to) it stops keeping them and a failure is final.
REPLAY_LIMIT = 4 * 1024 * 1024

Sender = Callable[[MilterClient], bool]


@dataclass(slots=True)
class MilterOutcome:
    """The answer to one step: a ``Verdict`` (None when no answer was due), the
    modifications sent before it (end of message only), or why the milter failed."""

    verdict: Verdict | None = None
    modifications: list[Modification] = field(default_factory=list)
    failed: str = ""

    @property
    def kind(self) -> str:
        if self.failed:
            return "failed"
        return self.verdict.kind if self.verdict is not None else "continue"


class MilterConnection:
    """One session's connection to one milter (``address`` as in ``[[milter]]``)."""

    def __init__(
        self,
        name: str,
        address: str,
        timeout: float,
        max_replacement: int = DEFAULT_MAX_REPLACEMENT,
        reuse_connections: str = "auto",
    ) -> None:
        self.name = name
        self.address = address
        self.timeout = timeout
        self.max_replacement = max_replacement or DEFAULT_MAX_REPLACEMENT
        self.client = MilterClient()
        self.failed = ""  # why the connection is dead, "" while it works
        self._socket: MilterSocket | None = None
        self.reused = False  # taken from the pool for this session
        self.reuse_connections = reuse_connections  # [[milter]] reuse_connections
        # The steps sent on a reused connection that has not answered yet (None when
        # the connection is fresh or has proven itself).
        self._replay: list[Sender] | None = None
        self._replay_octets = 0

    @property
    def negotiated(self) -> Negotiated | None:
        return self.client.negotiated

    @property
    def is_open(self) -> bool:
        return self._socket is not None and not self.failed

    async def open(self) -> MilterOutcome:
        """Connect and negotiate (SMFIC_OPTNEG)."""
        kind, host, port = parse_milter_address(self.address)
        loop = asyncio.get_running_loop()
        sock = self._socket = MilterSocket(self.client)
        try:
            async with asyncio.timeout(self.timeout):
                if kind == "unix":
                    await loop.create_unix_connection(lambda: sock, host)
                else:
                    await loop.create_connection(lambda: sock, host, port)
        except (OSError, TimeoutError) as exc:
            return self._fail(f"cannot connect to {self.address}: {_describe(exc)}")
        self.client.start()
        outcome = await self._exchange(expect_reply=True)
        if not outcome.failed and self.client.negotiated is None:
            return self._fail("no negotiation answer")
        return outcome

    async def step(self, send: Sender, *, flush: bool = False) -> MilterOutcome:
        """Run one protocol step (``send`` queues it and says whether a reply is due).
        A step without a reply may wait in the buffer, unless ``flush``."""
        if self.failed:
            return MilterOutcome(failed=self.failed)
        before = self.client.pending_output
        try:
            expect = send(self.client)
        except (RuntimeError, ValueError) as exc:
            return self._fail(f"cannot send: {exc}")
        if self._replay is None:
            if not (expect or flush) and self.client.pending_output < UNANSWERED_BUFFER:
                return MilterOutcome()  # queued, to go out with the next answered step
        else:
            self._replay.append(send)
            self._replay_octets += max(0, self.client.pending_output - before)
            if self._replay_octets > REPLAY_LIMIT:
                self._replay = None
        outcome = await self._exchange(expect_reply=expect, flush=flush)
        if self._replay is not None:
            if outcome.failed:
                return await self._retry_fresh(flush)
            if outcome.verdict is not None:
                self._replay = None  # the reused connection answered: it works
        return outcome

    # -- reuse across SMTP sessions (milter_pool.py) -------------------------------
    @property
    def can_be_reused(self) -> bool:
        return (
            self.reuse_connections != "never"
            and self.is_open
            and self._replay is None
            and self.client.may_quit_new_connection(any_state=self._any_state)
        )

    @property
    def _any_state(self) -> bool:
        return self.reuse_connections == "always"

    def still_open_while_idle(self) -> bool:
        """False when the milter closed (or reset) the connection while it idled."""
        return self._socket is not None and not self.failed and self._socket.is_open

    def reuse(self) -> None:
        """Start a new SMTP session on this idle connection: SMFIC_QUIT_NC is queued
        and goes out with the session's SMFIC_CONNECT."""
        self.client.quit_new_connection(any_state=self._any_state)
        self.reused = True
        self._replay = []
        self._replay_octets = 0

    def close_idle(self) -> None:
        """Close an idle connection (SMFIC_QUIT, no waiting): it expired or is dead."""
        # libmilter ends the connection at SMFIC_QUIT in any state.
        self._quit_and_close()

    async def _retry_fresh(self, flush: bool) -> MilterOutcome:
        """The reused connection failed before it answered anything in this session:
        open a fresh one and send the session's steps again."""
        sends = self._replay or []
        log.info(
            "milter %s: reused connection failed (%s), opening a new one", self.name, self.failed
        )
        self._replay = None
        self.reused = False
        self.failed = ""
        self._drop()
        self.client = MilterClient(
            actions=self.client.offered_actions, protocol=self.client.offered_protocol
        )
        outcome = await self.open()
        if outcome.failed:
            return outcome
        for index, send in enumerate(sends):
            last = index == len(sends) - 1
            outcome = await self.step(send, flush=flush and last)
            if outcome.kind != "continue" and not last:
                return outcome
        return outcome

    async def message(
        self,
        fields: Iterable[tuple[str, str]],
        body: Iterable[bytes],
        eoh_macros: Mapping[str, str],
        eom_macros: Mapping[str, str],
    ) -> MilterOutcome:
        """The message after DATA: each header field, end of headers, the body in
        chunks of at most 65535 octets, end of message. Stops early at a verdict that
        is not "continue" (a "skip" ends only the body)."""
        for name, value in fields:
            outcome = await self.step(partial(MilterClient.header, name=name, value=value))
            if outcome.kind != "continue":
                return outcome
        outcome = await self.step(lambda c: c.end_of_headers(macros=eoh_macros))
        if outcome.kind != "continue":
            return outcome
        for piece in body:
            skip = False
            for chunk in body_chunks(piece):
                outcome = await self.step(partial(MilterClient.body, chunk=chunk))
                if outcome.kind == "skip":
                    skip = True
                    break
                if outcome.kind != "continue":
                    return outcome
            if skip:
                break
        return await self.step(lambda c: c.end_of_message(macros=eom_macros))

    async def _exchange(self, *, expect_reply: bool, flush: bool = False) -> MilterOutcome:
        """Write what is queued; when a reply is due, read until the verdict. With no
        reply due, small output waits for the next exchange (``UNANSWERED_BUFFER``)."""
        sock = self._socket
        assert sock is not None
        outcome = MilterOutcome()
        if not (expect_reply or flush) and self.client.pending_output < UNANSWERED_BUFFER:
            return outcome
        loop = asyncio.get_running_loop()
        now = loop.time()
        ceiling = now + self.timeout * PROGRESS_CEILING
        replacement = 0
        client = self.client
        try:
            sock.write(client.data_to_send())
            if expect_reply or sock.write_paused:
                sock.arm(now + self.timeout)  # one timer per answer, not per step
            await sock.drain()
            while expect_reply:
                event = client.next_event()
                if event is None:
                    if sock.at_eof:
                        raise MilterProtocolError("the milter closed the connection")
                    await sock.wait()
                elif isinstance(event, Verdict):
                    outcome.verdict = event
                    break
                elif isinstance(event, Negotiated):
                    break
                elif isinstance(event, Progress):
                    # The milter is alive and working: give it the whole timeout
                    # again, up to the ceiling.
                    sock.arm(min(loop.time() + self.timeout, ceiling))
                else:
                    if isinstance(event, ReplaceBody):
                        replacement += len(event.chunk)
                        if replacement > self.max_replacement:
                            raise MilterProtocolError("replacement body too large")
                    outcome.modifications.append(event)
        except TimeoutError:
            return self._fail(f"no answer within {self.timeout:g} s")
        except MilterProtocolError as exc:
            if sock.error is not None:  # a reset, not garbage: say so
                return self._fail(_describe(sock.error))
            return self._fail(f"protocol error: {exc}")
        except OSError as exc:
            return self._fail(_describe(exc))
        finally:
            sock.disarm()
        if outcome.verdict is not None and outcome.verdict.kind == "shutdown":
            return self._fail("the milter shut the connection down")
        return outcome

    def _fail(self, why: str) -> MilterOutcome:
        self.failed = why
        if self._replay is None:  # a reused connection is retried first (step)
            log.warning("milter %s: %s", self.name, why)
        self._drop()
        return MilterOutcome(failed=why)

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _quit_and_close(self) -> None:
        """SMFIC_QUIT (when the conversation allows it) and close, without waiting:
        the transport writes what it holds before it closes."""
        sock = self._socket
        if sock is None:
            return
        if not self.failed and not self.client.closed and not self.client.awaiting_reply:
            with contextlib.suppress(RuntimeError, OSError):
                self.client.quit()
                sock.write(self.client.data_to_send())
        self._socket = None
        sock.close()

    async def abort(self) -> None:
        """SMFIC_ABORT: the transaction ended before end of message (sent at once, with
        whatever waited: the milter may free what it held for the message)."""
        if self.is_open and not self.client.awaiting_reply:
            await self.step(_abort, flush=True)

    async def close(self) -> None:
        """SMFIC_QUIT and close; quiet when the connection is already gone."""
        self._quit_and_close()


def _abort(client: MilterClient) -> bool:
    client.abort()
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["MilterConnection", "MilterOutcome", "Sender", "Stage"]
