"""What to tell a client when the disk under the spool or the queue fails.

A full disk or quota (``ENOSPC``/``EDQUOT``, SQLite's ``SQLITE_FULL``) is
``452 4.3.1`` (RFC 3463 X.3.1 "mail system full": the client keeps the message and
tries later); any other I/O error is ``451 4.3.0``. The client never sees the
exception; the mail log gets it.
"""

from __future__ import annotations

import errno

from postillon.core.reply import Reply

__all__ = ["STORAGE_ERROR", "STORAGE_FULL", "is_storage_full", "reply_for_storage_error"]

STORAGE_FULL = Reply.of(452, "4.3.1", "Insufficient system storage, try again later")
STORAGE_ERROR = Reply.of(451, "4.3.0", "Queue write failed, try again later")

_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode for "database or disk is full"


def is_storage_full(exc: BaseException) -> bool:
    """True if ``exc``, or an exception it was raised from, says the disk is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        current = current.__cause__ or current.__context__
    return False


def reply_for_storage_error(exc: BaseException) -> Reply:
    return STORAGE_FULL if is_storage_full(exc) else STORAGE_ERROR
