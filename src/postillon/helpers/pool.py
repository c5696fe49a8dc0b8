"""The server's side of its helper processes (``python -m postillon.helpers.process``).

The event loop writes a request down a pipe and awaits the answer; the work runs on
another core, outside the server's GIL. A request costs the loop a ``marshal`` and a
write, and the answer a read and a ``marshal`` back (bench/README.md has the figures).

Nothing here may lose or refuse mail: when no helper can answer (none could start, it
died, it took longer than :data:`ANSWER_TIMEOUT`, or it answered None), :meth:`HelperPool.call`
answers None and the caller does the work itself, as without the pool. A helper that died
is started again on a later request, at most once per :data:`RESTART_INTERVAL`.

State that every helper needs (the signing keys) is set with :meth:`HelperPool.share`: it
is sent to each running helper and to each one started later, before any request.

Both of its times (the answer timeout and the restart interval) come from an injected
:class:`LoopClock`, by default the running event loop's own ``time``/``call_later``, so a test
moves time by hand (as with Twisted's ``task.Clock``) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

from postillon.helpers.wire import LENGTH, MAX_FRAME, NO_ANSWER, encode

log = logging.getLogger("postillon.helpers")

ANSWER_TIMEOUT = 10.0
RESTART_INTERVAL = 5.0


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class LoopClock(Protocol):
    """Monotonic time and timers: the subset of :class:`asyncio.AbstractEventLoop` the pool
    uses, so the running loop itself is the real clock."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle: ...


class _Helper:
    """One child process and the requests it has not answered yet."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.alive = True
        self.reader = asyncio.ensure_future(self._read_answers())

    async def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                head = await stdout.readexactly(LENGTH.size)
                request_id, result = marshal.loads(await stdout.readexactly(LENGTH.unpack(head)[0]))
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, EOFError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError) or exc.partial:
                log.warning("helper process %s: unreadable answer (%r)", self.process.pid, exc)
            if self.alive:  # not stopped by us
                log.warning(
                    "helper process %s ended: the server does its work until it is replaced",
                    self.process.pid,
                )
                if self.process.returncode is None:  # unreadable, so useless: end it
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        self.process.kill()
        finally:
            self.fail_pending()

    def fail_pending(self) -> None:
        """The helper is gone: every request still waiting is done by the server instead."""
        self.alive = False
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)
        self.pending.clear()

    def write(self, frame: bytes) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(frame)

    def send(self, request_id: int, frame: bytes, future: asyncio.Future[Any]) -> None:
        self.pending[request_id] = future
        self.write(frame)

    async def stop(self) -> None:
        self.alive = False
        if self.process.stdin is not None:
            self.process.stdin.close()  # the helper's read ends: it exits
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        self.fail_pending()


class HelperPool:
    """``processes`` helper processes, started by :meth:`start` and stopped by :meth:`close`.

    Started by a server running as root (before it drops privileges: the interpreter may
    not be readable by the server's user), a helper drops to :attr:`user` itself once it
    has imported what it needs."""

    def __init__(
        self,
        processes: int,
        restart_interval: float = RESTART_INTERVAL,
        on_answer: Callable[[str, bool], None] | None = None,
        clock: LoopClock | None = None,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.processes = processes
        # None: the running event loop (the pool may be built before the loop runs).
        self._clock_override = clock
        self._answer_timeout = answer_timeout
        # Told of every request's end: its kind, and whether a helper answered it.
        self._on_answer = on_answer
        self.user: str | None = None
        self._unstartable = False
        self._restart_interval = restart_interval
        self._helpers: list[_Helper] = []
        self._ids = itertools.count(NO_ANSWER + 1)
        self._shared: dict[str, bytes] = {}  # kind -> its encoded state frame
        self._last_start = -restart_interval
        self._closed = False
        self._starting: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Future[None]] = set()

    @property
    def _clock(self) -> LoopClock:
        return self._clock_override or asyncio.get_running_loop()

    @property
    def pids(self) -> list[int]:
        return [h.process.pid for h in self._helpers if h.alive]

    async def start(self) -> None:
        self._last_start = self._clock.time()
        self._helpers = [h for h in self._helpers if h.alive]
        while len(self._helpers) < self.processes and not self._closed:
            user = ["--user", self.user] if self.user and os.geteuid() == 0 else []
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "postillon.helpers.process",
                    *user,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                log.warning(
                    "helper process could not start (%s%s): the server does its work",
                    exc,
                    f"; is {sys.executable} readable by the server's user?"
                    if isinstance(exc, PermissionError)
                    else "",
                )
                # Once refused, always refused (a Python the server's user cannot run).
                self._unstartable = isinstance(exc, PermissionError)
                return
            helper = _Helper(process)
            for frame in self._shared.values():
                helper.write(frame)
            self._helpers.append(helper)
            log.info("helper process %s started", process.pid)

    def share(self, kind: str, state: Any) -> None:
        """Give every helper, running or started later, ``state`` of ``kind``."""
        frame = encode((NO_ANSWER, kind, state))
        self._shared[kind] = frame
        for helper in self._helpers:
            if helper.alive:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    helper.write(frame)

    def submit(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        """A helper's answer to ``(kind, payload)``; None: do it yourself."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        live = [h for h in self._helpers if h.alive]
        if len(live) < self.processes:
            self._restart_later()
        if not live:
            future.set_result(None)
            return future
        helper = live[0] if len(live) == 1 else min(live, key=lambda h: len(h.pending))
        request_id = next(self._ids)
        frame = encode((request_id, kind, payload))
        if len(frame) > MAX_FRAME:
            future.set_result(None)
            return future
        try:
            helper.send(request_id, frame, future)
        except (ConnectionError, RuntimeError) as exc:
            log.warning("helper process %s: cannot send (%r)", helper.process.pid, exc)
            helper.fail_pending()
            if not future.done():
                future.set_result(None)
        return future

    async def call(self, kind: str, payload: Any) -> Any:
        """:meth:`submit` and :meth:`answer`."""
        return await self.answer(self.submit(kind, payload), kind)

    async def answer(self, future: asyncio.Future[Any], kind: str) -> Any:
        """The result of a :meth:`submit`, waited for at most ``answer_timeout``
        (:data:`ANSWER_TIMEOUT`; then None, and the helper that holds it is replaced: it is
        stuck)."""
        result = await self._wait(future, kind)
        if self._on_answer is not None:
            self._on_answer(kind, result is not None)
        return result

    async def _wait(self, future: asyncio.Future[Any], kind: str) -> Any:
        if future.done():
            return future.result()
        timer = self._clock.call_later(self._answer_timeout, lambda: self._time_out(future, kind))
        try:
            # Shielded: a caller cancelled meanwhile leaves the request to its helper.
            return await asyncio.shield(future)
        finally:
            timer.cancel()

    def _time_out(self, future: asyncio.Future[Any], kind: str) -> None:
        if future.done():
            return
        log.warning(
            "helper process took over %.0f s for %s: the server does it", self._answer_timeout, kind
        )
        for helper in self._helpers:
            if future in helper.pending.values():
                with contextlib.suppress(ProcessLookupError):
                    helper.process.kill()  # stuck: its reader sees EOF, it is replaced
        future.set_result(None)  # the caller does the work now, not when the helper is gone

    def resize(self, processes: int) -> None:
        """A new helper count (reload): extra helpers stop (the server does their
        requests), missing ones start."""
        self.processes = processes
        extra, self._helpers = self._helpers[processes:], self._helpers[:processes]
        for helper in extra:
            stopping = asyncio.ensure_future(helper.stop())
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
        self._last_start = -self._restart_interval
        self._restart_later()

    def _restart_later(self) -> None:
        if self._closed or self._unstartable:
            return
        if self._starting is not None and not self._starting.done():
            return
        if len([h for h in self._helpers if h.alive]) >= self.processes:
            return
        if self._clock.time() - self._last_start < self._restart_interval:
            return
        self._starting = asyncio.ensure_future(self.start())

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        await asyncio.gather(
            *(h.stop() for h in self._helpers), *self._stopping, return_exceptions=True
        )
        self._helpers = []
