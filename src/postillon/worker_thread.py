"""One worker thread for short blocking calls, waking the event loop once per batch.

``asyncio.to_thread`` costs, per call, a ThreadPoolExecutor submission, two chained
futures and a wake-up of the event loop through its self-pipe. For a call that takes a
fraction of a millisecond (an RSA-2048 signature: 0.27 ms, in OpenSSL with the GIL
released) that overhead is as large as the call. Here calls queue up for one thread; the
thread takes everything queued, runs it, and hands all results back to the loop with one
``call_soon_threadsafe``. Under load (many sessions committing at once) one wake-up
serves a whole batch; with a single call it costs no more than ``to_thread``.

Calls run in order, one at a time: use it only for calls that release the GIL and are
short, so a long one cannot hold up the others.

:func:`deliver_results` is the loop-side half, shared with the SQLite store's writer
thread: each waiting caller gets its result or exception, unless it gave up.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]
# (the caller's future, the result, the exception or None)
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class WorkerThread:
    """``await worker.run(fn)``: ``fn()`` in the worker thread. The thread starts on first
    use and is a daemon: it holds no state that must outlive the process."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start()
        self._calls.put((fn, future, loop))
        return await future

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            batch = [self._calls.get()]
            while True:
                try:
                    batch.append(self._calls.get_nowait())
                except queue.Empty:
                    break
            done: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
            for fn, future, loop in batch:
                try:
                    outcome: Outcome = (future, fn(), None)
                except BaseException as exc:  # handed to the awaiting coroutine
                    outcome = (future, None, exc)
                done.setdefault(loop, []).append(outcome)
            for loop, outcomes in done.items():
                try:
                    loop.call_soon_threadsafe(deliver_results, outcomes)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass


def deliver_results(outcomes: list[Outcome]) -> None:
    """Runs in the event loop: hand each caller its result or exception."""
    for future, result, exc in outcomes:
        if future.done():  # the awaiting coroutine was cancelled meanwhile
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
