"""One step of a decision trace (``postillon explain``): a domain value shared by
``checks`` (which make them) and ``queue`` (which keeps them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One line of the story ``postillon explain`` tells: at ``phase`` the check
    ``check`` saw ``saw`` and decided ``action`` (``reply`` is what the client was
    told because of it, "" when nothing). ``check`` "session" is the session's own
    steps (the client's command, the final reply of a phase)."""

    session_id: str
    at: float
    phase: str
    check: str
    action: str
    saw: str = ""
    reply: str = ""
    queue_id: str = ""  # "" until the transaction has one
    client_ip: str = ""
