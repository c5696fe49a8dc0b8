"""One directory fsync for every link made into it meanwhile (group commit).

Design note
-----------
A Maildir delivery is durable once its file is fsync'd and the directory entry in
``new/`` is too. Deliveries run in several worker threads at once; when they deliver
into the same mailbox (a busy mailbox, a catch-all, a list's archive), one fsync of
``new/`` that starts after all their links covers them all, so they need not each pay
one. ``DirectorySync.sync(directory)`` is called after the caller's link::

    take a ticket (under the directory's lock)
    while no fsync that started after my ticket has completed:
        if another thread is fsyncing: wait for it (it may have started before my
            ticket; then I loop)
        else: note the highest ticket issued, fsync (lock released), mark those done

Every link made before its ticket was taken is in the directory when an fsync that
starts later runs, so a caller returns only when its own link is durable. When an
fsync fails, the thread that ran it raises; the callers waiting on it take their turn
and run their own fsync (each returns only after a successful fsync that covers it,
or raises its own error): an error is never swallowed, never shared by guesswork.
States of directories nobody is syncing are dropped, so the table stays as small as
the set of mailboxes being delivered to right now.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["DirectorySync", "fsync_dir"]


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _State:
    __slots__ = ("cond", "done", "issued", "syncing", "users")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.issued = 0  # tickets handed out
        self.done = 0  # every ticket up to this one is durable
        self.syncing = False
        self.users = 0  # threads inside sync() for this directory (guarded by the table lock)


class DirectorySync:
    """Group commit of directory fsyncs; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Path, _State] = {}
        self.fsyncs = 0  # directory fsyncs run (tests read it)

    def sync(self, directory: Path) -> None:
        """Return once an fsync of ``directory`` that started after this call has
        succeeded; raise OSError if the one this thread ran failed."""
        with self._lock:
            state = self._states.get(directory)
            if state is None:
                state = self._states[directory] = _State()
            state.users += 1
        try:
            self._sync(directory, state)
        finally:
            with self._lock:
                state.users -= 1
                if state.users == 0:
                    del self._states[directory]

    def _sync(self, directory: Path, state: _State) -> None:
        with state.cond:
            state.issued += 1
            ticket = state.issued
            while state.done < ticket:
                if state.syncing:
                    state.cond.wait()
                    continue
                state.syncing = True
                upto = state.issued
                state.cond.release()
                try:
                    fsync_dir(directory)
                    self.fsyncs += 1
                finally:
                    state.cond.acquire()
                    state.syncing = False
                    state.cond.notify_all()
                state.done = max(state.done, upto)
