"""DKIM verification in separate processes (``dkim_worker``), as seen from the server.

The event loop sends a message and its key records down a pipe and awaits the answer;
the hashing, canonicalisation and signature checks run on another core, outside the
server's GIL. Measured on the 2-core benchmark machine, verifying two signatures inline
cost 0.6 ms of event-loop time per message; through the pipe it costs a write, a read
and a ``marshal`` each way (bench/README.md has the figures).

Nothing here may lose or refuse mail: when no worker can answer (it could not start, it
died, it took longer than :data:`ANSWER_TIMEOUT`, or it asks for a key the server did not
send), :meth:`DkimVerifierPool.submit` answers None and the caller verifies inline, as
without the pool. A worker that died is started again on a later message, at most once
per :data:`RESTART_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import sys
import time

from postillon.checks.dkim_worker import LENGTH, MAX_FRAME, KeyAnswer, ResultRow, encode

log = logging.getLogger("postillon.checks.dkim")

ANSWER_TIMEOUT = 10.0
RESTART_INTERVAL = 5.0
Answer = list[ResultRow] | None


class _Worker:
    """One child process and the requests it has not answered yet."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future[Answer]] = {}
        self.alive = True
        self.reader = asyncio.ensure_future(self._read_answers())

    async def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                head = await stdout.readexactly(LENGTH.size)
                request_id, rows = marshal.loads(await stdout.readexactly(LENGTH.unpack(head)[0]))
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(rows)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, EOFError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError) or exc.partial:
                log.warning("DKIM verifier %s: unreadable answer (%r)", self.process.pid, exc)
            if self.alive:  # not stopped by us
                log.warning(
                    "DKIM verifier process %s ended: verifying inline until it is replaced",
                    self.process.pid,
                )
                if self.process.returncode is None:  # unreadable, so useless: end it
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        self.process.kill()
        finally:
            self.fail_pending()

    def fail_pending(self) -> None:
        """The worker is gone: every request still waiting is verified inline instead."""
        self.alive = False
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)
        self.pending.clear()

    def send(self, request_id: int, frame: bytes, future: asyncio.Future[Answer]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        self.pending[request_id] = future
        stdin.write(frame)

    async def stop(self) -> None:
        self.alive = False
        if self.process.stdin is not None:
            self.process.stdin.close()  # the worker's read ends: it exits
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


class DkimVerifierPool:
    """``processes`` verifier processes, started by :meth:`start` (after privileges are
    dropped: they run as the server's user) and stopped by :meth:`close`."""

    def __init__(self, processes: int, restart_interval: float = RESTART_INTERVAL) -> None:
        self.processes = processes
        # Started as root (before the server drops privileges), a worker drops to this
        # user itself once it has imported what it needs.
        self.user: str | None = None
        self._unstartable = False
        self._restart_interval = restart_interval
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._last_start = -restart_interval
        self._closed = False
        self._starting: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Future[None]] = set()

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.alive]

    async def start(self) -> None:
        self._last_start = time.monotonic()
        self._workers = [w for w in self._workers if w.alive]
        while len(self._workers) < self.processes and not self._closed:
            user = ["--user", self.user] if self.user and os.geteuid() == 0 else []
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "postillon.checks.dkim_worker",
                    *user,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                log.warning(
                    "DKIM verifier process could not start (%s%s): verifying inline",
                    exc,
                    f"; is {sys.executable} readable by the server's user?"
                    if isinstance(exc, PermissionError)
                    else "",
                )
                # Once refused, always refused (a Python the server's user cannot run).
                self._unstartable = isinstance(exc, PermissionError)
                return
            self._workers.append(_Worker(process))
            log.info("DKIM verifier process %s started", process.pid)

    def submit(self, message: bytes, keys: dict[str, KeyAnswer]) -> asyncio.Future[Answer]:
        """The rows for ``message`` (see ``dkim_worker``), or None: verify it inline."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        live = [w for w in self._workers if w.alive]
        if len(live) < self.processes:
            self._restart_later()
        if not live or len(message) > MAX_FRAME // 2:
            future.set_result(None)
            return future
        worker = min(live, key=lambda w: len(w.pending))
        request_id = next(self._ids)
        try:
            worker.send(request_id, encode((request_id, message, keys)), future)
        except (ConnectionError, RuntimeError) as exc:
            log.warning("DKIM verifier %s: cannot send (%r)", worker.process.pid, exc)
            worker.fail_pending()
            if not future.done():
                future.set_result(None)
        return future

    async def verify(self, message: bytes, keys: dict[str, KeyAnswer]) -> Answer:
        """:meth:`submit` and wait, at most :data:`ANSWER_TIMEOUT` (then None)."""
        future = self.submit(message, keys)
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                return await asyncio.shield(future)
        except TimeoutError:
            log.warning("DKIM verifier took over %.0f s: verifying inline", ANSWER_TIMEOUT)
            for worker in self._workers:
                if future in worker.pending.values():
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()  # stuck: its reader sees EOF, it is replaced
            return None

    def resize(self, processes: int) -> None:
        """A new worker count (reload): extra workers stop (their requests are verified
        inline), missing ones start."""
        self.processes = processes
        extra, self._workers = self._workers[processes:], self._workers[:processes]
        for worker in extra:
            stopping = asyncio.ensure_future(worker.stop())
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
        self._last_start = -self._restart_interval
        self._restart_later()

    def _restart_later(self) -> None:
        if self._closed or self._unstartable:
            return
        if self._starting is not None and not self._starting.done():
            return
        if len([w for w in self._workers if w.alive]) >= self.processes:
            return
        if time.monotonic() - self._last_start < self._restart_interval:
            return
        self._starting = asyncio.ensure_future(self.start())

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        await asyncio.gather(
            *(w.stop() for w in self._workers), *self._stopping, return_exceptions=True
        )
        self._workers = []
