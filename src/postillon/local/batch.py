"""Maildir deliveries in batches: a few worker threads, one ``new/`` fsync per batch.

Design note
-----------
A Maildir delivery blocks on the disk (a file fsync, then an fsync of ``new/``), so it
runs off the event loop. Handing every delivery to the default executor on its own
costs a thread wake-up and a loop wake-up per message, and an fsync of ``new/`` per
message although one fsync covers every link made into that directory before it.
``DeliveryBatcher`` does group commit instead::

    deliver(stage) -- event loop --> queue --> worker thread:
        take every waiting job (up to MAX_BATCH)
        stage each: write tmp/, fsync the file, link into new/   (MaildirDelivery.stage)
        fsync each distinct new/ once                            (MaildirDelivery.commit)
        one call_soon_threadsafe resolves every job of the batch

A job's outcome is Delivered only after the fsync of its ``new/`` that started after
its link, so a message reported delivered is durable before the queue records it; a
crash before that fsync leaves a link the retry recognises (the ``delivery_key``
name), never a loss. When the fsync of a ``new/`` fails, the files linked into it in
this batch are unlinked again and their outcomes are temporary.

Threads start on demand, at most ``threads`` (several batches in flight share the
disk's queue), and exit after :data:`IDLE_EXIT` seconds without work, so a
transport dropped by a reload leaves no thread behind. A job whose awaiting task
was cancelled still completes (the outcome is dropped; the queue retries, and the
``delivery_key`` makes that retry find the delivered file).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from postillon.core.outcome import Outcome, TempFail
from postillon.local.maildir import LOCAL_ERROR, MaildirDelivery, Staged

__all__ = ["IDLE_EXIT", "MAX_BATCH", "DeliveryBatcher"]

MAX_BATCH = 64  # jobs one worker takes at once (a job = one message, its recipients)
IDLE_EXIT = 30.0  # seconds a worker waits for work before it exits


_Result = tuple["asyncio.Future[list[Outcome]]", "list[Outcome] | BaseException"]


@dataclass(slots=True)
class _Job:
    stage: Callable[[], Sequence[Staged]]
    future: asyncio.Future[list[Outcome]]
    staged: Sequence[Staged] = ()
    error: BaseException | None = None


class DeliveryBatcher:
    """Runs staging callables in worker threads and commits them in batches."""

    def __init__(self, maildir: MaildirDelivery, *, threads: int = 4) -> None:
        self._maildir = maildir
        self._threads = threads
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # worker threads running
        self._idle = 0  # of them, waiting for work
        self.batches = 0  # batches committed (tests and metrics read it)

    async def deliver(self, stage: Callable[[], Sequence[Staged]]) -> list[Outcome]:
        """Run ``stage`` (blocking: it writes and links the files) in a worker, then
        commit it with whatever else that worker took; one outcome per staging."""
        job = _Job(stage, asyncio.get_running_loop().create_future())
        with self._lock:
            self._queue.put(job)
            if self._idle == 0 and self._live < self._threads:
                self._live += 1
                threading.Thread(target=self._work, name="maildir-delivery", daemon=True).start()
        return await job.future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._queue.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():  # put() holds the lock: nothing is lost
                        self._live -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        for job in batch:
            try:
                job.staged = job.stage()
            except Exception as exc:  # stage() returns outcomes; this is a bug, not mail
                job.error = exc
        staged = [s for job in batch for s in job.staged]
        try:
            outcomes = self._maildir.commit(staged)
        except Exception as exc:  # commit() maps OSErrors; anything else is temporary
            outcomes = [TempFail(LOCAL_ERROR, f"{type(exc).__name__}: {exc}") for _ in staged]
        self.batches += 1
        by_loop: dict[asyncio.AbstractEventLoop, list[_Result]] = {}
        start = 0
        for job in batch:
            end = start + len(job.staged)
            result = job.error if job.error is not None else outcomes[start:end]
            by_loop.setdefault(job.future.get_loop(), []).append((job.future, result))
            start = end
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass


def _resolve(results: list[_Result]) -> None:
    for future, result in results:
        if future.done():  # the awaiting task was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
