# THE STATE TRANSITION TABLE OF THE SMTP/LMTP SERVER CORE LIVES IN THIS FILE, AND ONLY HERE.
#
# Two tables (h11 ``_state.py`` habit):
#
# * ADMISSIBLE says in which states a state-dependent command may go on to its
#   handler; REFUSAL names the reply for each (command, state) that may not
#   (default: 503 5.5.1). Commands not listed (RSET, NOOP, QUIT, HELP, VRFY,
#   EXPN) are admissible in every state in which commands are read at all.
# * TRANSITIONS maps (state, trigger) to the next state. A missing entry is a
#   bug in the core, not a peer error: ``transition()`` raises RuntimeError.
#
# Commands are only read in GREETED, READY, MAIL, RCPT and BDAT. In AUTH each
# line is a base64 SASL response (RFC 4954 §4) or "*" to cancel. In DATA the
# input is the message body; in STARTTLS every byte is discarded until the
# adapter calls ``tls_established()``; in CONNECTED (before ``greet()``) and
# CLOSED nothing is read.
"""State table of the SMTP/LMTP server core (see the comment at the top)."""

from __future__ import annotations

from enum import StrEnum

from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol.errors import ProtocolError


class State(StrEnum):
    CONNECTED = "CONNECTED"  # created; greet() not called yet
    GREETED = "GREETED"  # 220 sent; waiting for EHLO/HELO (LHLO in LMTP)
    READY = "READY"  # hello accepted; no transaction
    MAIL = "MAIL"  # MAIL accepted; no recipient accepted yet
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # 354 sent: reading the body, then answering MessageComplete
    BDAT = "BDAT"  # inside a BDAT transaction (between or after chunks)
    STARTTLS = "STARTTLS"  # 220 to STARTTLS sent; waiting for tls_established()
    AUTH = "AUTH"  # inside a SASL exchange: lines are responses, not commands
    CLOSED = "CLOSED"  # 221/421 queued, or the peer closed


class Command(StrEnum):
    """Commands whose admissibility depends on the state."""

    HELLO = "HELLO"  # EHLO, HELO, LHLO
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"


class Trigger(StrEnum):
    GREET = "GREET"  # greet() queued a positive greeting
    HELLO_ACCEPTED = "HELLO_ACCEPTED"
    RESET = "RESET"  # RSET, a new hello, a failed BDAT, an aborted BDAT message
    MAIL_ACCEPTED = "MAIL_ACCEPTED"
    RCPT_ACCEPTED = "RCPT_ACCEPTED"
    DATA_ACCEPTED = "DATA_ACCEPTED"  # 354 to DATA
    BDAT_ACCEPTED = "BDAT_ACCEPTED"  # go-ahead for the first BDAT chunk
    MESSAGE_DONE = "MESSAGE_DONE"  # last reply to MessageComplete, or message aborted
    STARTTLS_ACCEPTED = "STARTTLS_ACCEPTED"  # 220 to STARTTLS
    TLS_ESTABLISHED = "TLS_ESTABLISHED"  # RFC 3207 §4.2: back to the initial state
    AUTH_STARTED = "AUTH_STARTED"  # an admissible AUTH with a known mechanism
    AUTH_DONE = "AUTH_DONE"  # 235, 535, 501 (cancelled or malformed) or another refusal
    CLOSE = "CLOSE"  # QUIT, 421, refused greeting, EOF


S = State
C = Command
T = Trigger

ADMISSIBLE: dict[Command, frozenset[State]] = {
    C.HELLO: frozenset({S.GREETED, S.READY, S.MAIL, S.RCPT, S.BDAT}),
    C.MAIL: frozenset({S.READY}),
    C.RCPT: frozenset({S.MAIL, S.RCPT}),
    C.DATA: frozenset({S.RCPT}),
    C.BDAT: frozenset({S.RCPT, S.BDAT}),
    C.STARTTLS: frozenset({S.READY}),
    C.AUTH: frozenset({S.READY}),
}

REFUSAL: dict[tuple[Command, State], Reply] = {
    (C.MAIL, S.GREETED): R.NEED_HELLO,
    (C.MAIL, S.MAIL): R.NESTED_MAIL,
    (C.MAIL, S.RCPT): R.NESTED_MAIL,
    (C.MAIL, S.BDAT): R.NESTED_MAIL,
    (C.RCPT, S.GREETED): R.NEED_HELLO,
    (C.RCPT, S.READY): R.NEED_MAIL,
    (C.RCPT, S.BDAT): R.BAD_SEQUENCE,
    (C.DATA, S.GREETED): R.NEED_HELLO,
    (C.DATA, S.READY): R.NEED_MAIL,
    (C.DATA, S.MAIL): R.NO_VALID_RECIPIENTS,  # 503 in LMTP (RFC 2033 §4.2): see server.py
    (C.DATA, S.BDAT): R.DATA_AFTER_BDAT,  # RFC 3030 §3
    (C.BDAT, S.GREETED): R.NEED_HELLO,
    (C.BDAT, S.READY): R.NEED_MAIL,
    (C.BDAT, S.MAIL): R.NO_VALID_RECIPIENTS,
    (C.STARTTLS, S.GREETED): R.NEED_HELLO,
    (C.STARTTLS, S.MAIL): R.IN_TRANSACTION,
    (C.STARTTLS, S.RCPT): R.IN_TRANSACTION,
    (C.STARTTLS, S.BDAT): R.IN_TRANSACTION,
    (C.AUTH, S.GREETED): R.NEED_HELLO,
    (C.AUTH, S.MAIL): R.IN_TRANSACTION,
    (C.AUTH, S.RCPT): R.IN_TRANSACTION,
    (C.AUTH, S.BDAT): R.IN_TRANSACTION,
}

TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (S.CONNECTED, T.GREET): S.GREETED,
    (S.GREETED, T.HELLO_ACCEPTED): S.READY,
    (S.GREETED, T.RESET): S.GREETED,  # RSET before any hello changes nothing
    (S.READY, T.HELLO_ACCEPTED): S.READY,
    (S.READY, T.RESET): S.READY,
    (S.READY, T.MAIL_ACCEPTED): S.MAIL,
    (S.READY, T.STARTTLS_ACCEPTED): S.STARTTLS,
    (S.MAIL, T.RESET): S.READY,
    (S.MAIL, T.RCPT_ACCEPTED): S.RCPT,
    (S.RCPT, T.RESET): S.READY,
    (S.RCPT, T.RCPT_ACCEPTED): S.RCPT,
    (S.RCPT, T.DATA_ACCEPTED): S.DATA,
    (S.RCPT, T.BDAT_ACCEPTED): S.BDAT,
    (S.DATA, T.MESSAGE_DONE): S.READY,
    (S.BDAT, T.RESET): S.READY,
    (S.BDAT, T.MESSAGE_DONE): S.READY,
    (S.STARTTLS, T.TLS_ESTABLISHED): S.GREETED,
    (S.READY, T.AUTH_STARTED): S.AUTH,
    (S.AUTH, T.AUTH_DONE): S.READY,
}
# CLOSE is accepted from every state (see transition()).

READS_COMMANDS = frozenset({S.GREETED, S.READY, S.MAIL, S.RCPT, S.BDAT})
READS_LINES = READS_COMMANDS | {S.AUTH}
IN_TRANSACTION = frozenset({S.MAIL, S.RCPT, S.DATA, S.BDAT})


def check(command: Command, state: State) -> None:
    """Raise ProtocolError with the right reply unless ``command`` may run in ``state``."""
    if state not in ADMISSIBLE[command]:
        raise ProtocolError(REFUSAL.get((command, state), R.BAD_SEQUENCE))


def transition(state: State, trigger: Trigger) -> State:
    if trigger is T.CLOSE:
        return S.CLOSED
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise RuntimeError(f"no transition from {state.value} on {trigger.value}") from None
