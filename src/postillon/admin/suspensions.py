"""Destination suspensions for operators: list, suspend, resume (the CLI's
``postillon queue suspend|resume`` and the admin API/page share these).

A suspension stops new connections to a destination (a recipient domain, or an
``mx:`` shaping rule's match) until it ends; its messages wait without counting
an attempt (outbound/shaping.py). The server notices a change within a few
seconds (each process re-reads the table). Resuming also makes every deferred
record due now, so the waiting messages go at once instead of at the end of the
suspension they were deferred for.
"""

from __future__ import annotations

import datetime
from typing import Any

from postillon.outbound.shaping import UNREACHABLE
from postillon.queue.shaping_state import Suspension
from postillon.queue.store import QueueStore

__all__ = ["DEFAULT_SECONDS", "list_json", "resume", "suspend", "suspension_json"]

DEFAULT_SECONDS = 3600.0  # an operator's suspension without --for
MAX_SECONDS = 30 * 86400.0


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def suspension_json(s: Suspension, now: float) -> dict[str, Any]:
    return {
        "destination": s.destination,
        "since": _iso(s.since),
        "until": _iso(s.until),
        "remaining_seconds": max(0, round(s.until - now)),
        "reason": s.reason,
        "level": s.level,
        "by_operator": s.operator,
    }


async def list_json(store: QueueStore, now: float) -> list[dict[str, Any]]:
    return [suspension_json(s, now) for s in await store.shaping.suspensions(now)]


def _destination(text: str) -> str:
    value = text.strip().lower()
    if not value or any(c.isspace() for c in value) or len(value) > 255:
        raise ValueError(f"not a destination: {text!r} (a domain, or mx:.provider.example)")
    return value


async def suspend(
    store: QueueStore, destination: str, now: float, seconds: float, reason: str
) -> dict[str, Any]:
    """Suspend ``destination`` for ``seconds`` (ValueError for a bad argument)."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"the duration must be between 1 s and {MAX_SECONDS / 86400:.0f} days")
    suspension = Suspension(
        _destination(destination), now, now + seconds, reason.strip()[:300] or "operator", 0, True
    )
    await store.shaping.suspend(suspension)
    return suspension_json(suspension, now)


async def resume(store: QueueStore, destination: str, now: float) -> dict[str, Any]:
    """Lift ``destination``'s suspension; the deferred records become due now."""
    lifted = await store.shaping.resume(_destination(destination))
    due = await store.flush(now) if lifted else 0
    return {"destination": destination.strip().lower(), "resumed": lifted, "recipients": due}


async def lift_unreachable(store: QueueStore, now: float) -> int:
    """Lift the dead-destination suspensions (``queue flush``, an operator's retry:
    try now, as Postfix's flush revives dead sites); how many."""
    lifted = 0
    for s in await store.shaping.suspensions(now):
        if not s.operator and s.reason.startswith(UNREACHABLE):
            lifted += await store.shaping.resume(s.destination)
    return lifted
