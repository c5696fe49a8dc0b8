"""The delivery priority of a message: the order in which the runner claims work.

Design note
-----------
A queue with a bulk backlog (a newsletter of 50,000 messages) must not make a
password reset, a bounce or a message that has waited for hours wait behind it.
The store claims due records highest ``priority`` first, then by ``next_try``
(queue/store.py step 9), so the priority is a claim order, not a deadline, and a
message never waits for a *lower* one. Levels (higher goes first):

``DSN_PRIORITY`` (20)            delivery status notifications (bounces, delays):
                                 the sender is waiting to learn what happened.
``INTERACTIVE_PRIORITY`` (10)    mail a person just sent: an authenticated
  + MT-PRIORITY                  submission, or the local ``sendmail`` command.
MT-PRIORITY (-9 .. 9)            RFC 6710's value, honoured from trusted and
                                 authenticated senders only (§4.1: a server may lower
                                 what an unknown client asks for); 0 otherwise.
``RETRY_PRIORITY`` (1), at least a record deferred after an attempt (the store
                                 raises it): a retry goes ahead of fresh default and
                                 bulk mail, behind interactive mail.

So a bulk sender that marks its mail ``MT-PRIORITY=-5`` goes behind everything.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DSN_PRIORITY",
    "INTERACTIVE_PRIORITY",
    "MT_PRIORITY_RANGE",
    "RETRY_PRIORITY",
    "message_priority",
]

DSN_PRIORITY: Final = 20
INTERACTIVE_PRIORITY: Final = 10
RETRY_PRIORITY: Final = 1  # kept in the stores' SQL beside the retry update
MT_PRIORITY_RANGE: Final = range(-9, 10)  # RFC 6710 §2: -9 .. 9, 0 the default

# Sources whose mail a person is waiting on (intake's ``source``): the local
# submission command. Authenticated SMTP clients count through ``authenticated``.
_INTERACTIVE_SOURCES: Final = frozenset({"sendmail"})
_NOTICE_SOURCES: Final = frozenset({"bounce"})


def message_priority(
    mt_priority: int | None, *, source: str, authenticated: bool, trusted: bool
) -> int:
    """The claim priority of a new message (see the module note)."""
    if source in _NOTICE_SOURCES:
        return DSN_PRIORITY
    honoured = mt_priority if mt_priority is not None and (authenticated or trusted) else 0
    if authenticated or source in _INTERACTIVE_SOURCES:
        return INTERACTIVE_PRIORITY + honoured
    return honoured
