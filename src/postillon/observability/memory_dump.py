"""Where the server's memory goes, on request only: ``POSTILLON_MEMORY_DUMP=DIR``.

With that variable set, ``postillon serve`` writes into DIR every :data:`INTERVAL` seconds
(each file replaced whole): ``modules.txt`` (every imported module), ``threads.txt``
(every thread) and, when ``tracemalloc`` traces (start the server with
``PYTHONTRACEMALLOC=1`` or more frames), ``tracemalloc.snapshot`` with the peak in
``tracemalloc.txt``. ``bench/memory_breakdown.py`` reads them beside ``/proc/PID/smaps``.
DIR must be writable by the server's user (it drops privileges). Without the variable
nothing runs: no task, no file, no cost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

ENVIRONMENT = "POSTILLON_MEMORY_DUMP"
INTERVAL = 2.0


def start_memory_dumps() -> asyncio.Task[None] | None:
    """The dumping task when :data:`ENVIRONMENT` names a directory, else None. Called
    before the privilege drop: what the dumps import must be imported as root (the
    interpreter's library may be unreadable by the server's user)."""
    directory = os.environ.get(ENVIRONMENT)
    if not directory:
        return None
    import tracemalloc  # noqa: F401 (imported now, see above)

    return asyncio.ensure_future(_dump_every(Path(directory)))


async def _dump_every(directory: Path) -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        try:
            await asyncio.to_thread(dump, directory)
        except Exception as exc:  # a debugging aid never stops the server
            print(f"postillon: {ENVIRONMENT}: {exc!r}", file=sys.stderr)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    partial.replace(path)


def dump(directory: Path) -> None:
    import tracemalloc

    _write(directory / "modules.txt", "".join(f"{name}\n" for name in sorted(sys.modules)))
    _write(
        directory / "threads.txt",
        "".join(f"{thread.native_id} {thread.name}\n" for thread in threading.enumerate()),
    )
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        partial = directory / "tracemalloc.snapshot.part"
        tracemalloc.take_snapshot().dump(str(partial))
        partial.replace(directory / "tracemalloc.snapshot")
        _write(directory / "tracemalloc.txt", f"current {current}\npeak {peak}\n")
