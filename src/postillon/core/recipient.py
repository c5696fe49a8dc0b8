"""What the check of one recipient (RCPT TO) decided: accepted with its final delivery
addresses, or rejected with a reply.

Values shared by ``routing`` (which decides), ``checks`` (the relay policy passes the
decision on) and ``inbound`` (the session acts on it); in ``core`` so that the session
needs no ``routing``.
"""

from __future__ import annotations

from dataclasses import dataclass

from postillon.core.reply import Reply


@dataclass(frozen=True, slots=True)
class RecipientAccepted:
    """The recipient is ours. ``targets`` are the final delivery addresses: local
    mailboxes as ``localpart@domain`` (lower-cased, :meth:`LocalRecipients.mailbox_exists`
    is true for them) and remote addresses exactly as the alias table wrote them.
    ``dropped`` lists alias targets that named nothing (for the mail log)."""

    targets: tuple[str, ...]
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecipientRejected:
    """The recipient is refused with ``reply``; ``detail`` is for the log only."""

    reply: Reply
    detail: str = ""
