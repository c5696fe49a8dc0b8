"""The values the policy pipeline speaks: phases, decisions, changes, trace steps.

Pure data (no I/O), shared by every check, the pipeline, the session that acts on a
decision, and the explain trace. See the package note (``checks/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postillon.core.reply import Reply
from postillon.core.trace import TraceStep as TraceStep  # re-exported for checks

# The points of an SMTP session where the pipeline is asked, in order. "connect" runs
# after the greet pause (so a pregreet is known), before the greeting.
Phase = Literal["connect", "helo", "mail", "rcpt", "data", "end_of_data"]
PHASES: tuple[Phase, ...] = ("connect", "helo", "mail", "rcpt", "data", "end_of_data")

# continue:   no objection; the next check is asked.
# accept:     this check is done with the transaction (or, at connect/helo, the session):
#             it is not asked again for it; the others still are (milter SMFIR_ACCEPT).
# reject:     refuse with ``reply`` (4xx or 5xx): the connection at connect (and
#             ``disconnect``), the command at helo/mail/data, the recipient at rcpt,
#             the message at end of data. No later check is asked.
# discard:    tell the client 250 and drop the message (milter SMFIR_DISCARD); at rcpt
#             and before, the transaction is marked and dropped at end of data.
# quarantine: accept and hold the message (``reason``); later checks are still asked.
Action = Literal["continue", "accept", "reject", "discard", "quarantine"]


# -- changes a check may ask for (applied by the pipeline, in order) ----------------
@dataclass(frozen=True, slots=True)
class AddHeader:
    """Add ``name: value``. ``index`` counts header fields of the client's section:
    0 = on top (above the client's fields, where Authentication-Results: goes),
    None = at the bottom (milter SMFIR_ADDHEADER), i = before the i-th field
    (milter SMFIR_INSHEADER)."""

    name: str
    value: str
    index: int | None = 0


@dataclass(frozen=True, slots=True)
class AddRawFields:
    """Put these header fields, exactly as given (CRLF lines), on top of the message,
    above those added before: Authentication-Results: and an ARC set, whose bytes a
    signature covers and must not be re-folded."""

    fields: bytes


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the ``occurrence``-th (1-based) field called ``name``; ``value`` None
    deletes it (milter SMFIR_CHGHEADER)."""

    name: str
    occurrence: int
    value: str | None


@dataclass(frozen=True, slots=True)
class SetHeaderSection:
    """Replace the client's whole header section (CRLF lines, no final empty line).
    For checks that filter fields themselves (removing forged Authentication-Results:)."""

    header: bytes


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace the body (everything after the header section; milter SMFIR_REPLBODY).
    Chunks of one check are concatenated in order."""

    body: bytes


@dataclass(frozen=True, slots=True)
class ChangeSender:
    """Replace the envelope sender ("" = null sender; milter SMFIR_CHGFROM)."""

    address: str
    params: str = ""


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    params: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class RouteRecipient:
    """At rcpt: the recipient the client gave is delivered to these final addresses
    (alias expansion; the relay check). Without it the address itself is the target."""

    targets: tuple[str, ...]


Change = (
    AddHeader
    | AddRawFields
    | ChangeHeader
    | SetHeaderSection
    | ReplaceBody
    | ChangeSender
    | AddRecipient
    | DeleteRecipient
    | RouteRecipient
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one check decided at one phase. ``saw`` says in one line what the check
    looked at (for explain and the log: "192.0.2.1 listed by zen.example (127.0.0.2),
    score 2 of threshold 2"); ``reason`` is the log reason / quarantine reason."""

    action: Action = "continue"
    reply: Reply | None = None
    saw: str = ""
    reason: str = ""
    changes: tuple[Change, ...] = ()
    # reject only: close the connection after the reply (421, refusals at connect).
    disconnect: bool = False
    # The metrics reason counted when this rejects (observability: "relay", "rate_limit").
    metric: str = ""

    def __post_init__(self) -> None:
        if self.action == "reject" and (self.reply is None or self.reply.code < 400):
            raise ValueError("a reject needs a 4xx or 5xx reply")


CONTINUE = Decision()


def proceed(saw: str = "", *changes: Change) -> Decision:
    return Decision("continue", saw=saw, changes=changes)


def reject(
    reply: Reply, saw: str = "", *, reason: str = "", disconnect: bool = False, metric: str = ""
) -> Decision:
    return Decision(
        "reject", reply, saw=saw, reason=reason or str(reply), disconnect=disconnect, metric=metric
    )


def quarantine(reason: str, saw: str = "", *changes: Change) -> Decision:
    return Decision("quarantine", saw=saw, reason=reason, changes=changes)


def discard(saw: str = "", reason: str = "") -> Decision:
    return Decision("discard", saw=saw, reason=reason)
