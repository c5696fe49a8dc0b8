"""postillon.worker_thread: calls run in its one thread; results, errors and cancellation
reach the right awaiting coroutine; concurrent calls share wake-ups."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from postillon.worker_thread import WorkerThread


async def test_results_and_errors_reach_their_callers() -> None:
    worker = WorkerThread("test-worker")

    def boom() -> int:
        raise ValueError("no key")

    assert await worker.run(lambda: threading.current_thread().name) == "test-worker"
    with pytest.raises(ValueError, match="no key"):
        await worker.run(boom)
    assert await worker.run(lambda: 42) == 42


async def test_concurrent_calls_are_batched_and_each_gets_its_own_result() -> None:
    worker = WorkerThread("test-batch")
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        # The first call keeps the thread busy while the others queue behind it.
        first = asyncio.ensure_future(worker.run(lambda: time.sleep(0.2) or -1))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(worker.run(lambda i=i: i * i) for i in range(50)))
        assert await first == -1
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    assert results == [i * i for i in range(50)]
    assert wakeups <= 3  # the first call, then one batch (at most two)


async def test_a_cancelled_caller_does_not_break_the_others() -> None:
    worker = WorkerThread("test-cancel")
    slow = asyncio.ensure_future(worker.run(lambda: time.sleep(0.1) or "slow"))
    await asyncio.sleep(0.01)
    slow.cancel()
    assert await worker.run(lambda: "next") == "next"
    with pytest.raises(asyncio.CancelledError):
        await slow
