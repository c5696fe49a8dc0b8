"""At most two glibc malloc arenas for the server (``M_ARENA_MAX``).

glibc gives each thread that allocates while another holds the lock an arena of its
own, up to eight per CPU; memory freed in one stays there. The server has an event-loop
thread, the queue store's writer and reader threads and libuv's four workers: under the
bench load the other threads' arenas held 4.6 MiB of its peak PSS (bench/README.md,
"Memory"). With two, the event loop keeps the main arena and every other thread shares
one. Python objects are unaffected (pymalloc has its own arenas). An operator's own
``MALLOC_ARENA_MAX`` (which glibc read at start) is left alone; elsewhere than glibc this
does nothing.
"""

from __future__ import annotations

import os

ARENAS = 2
_M_ARENA_MAX = -8  # <malloc.h>


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Call before starting threads; True when glibc took the limit."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
