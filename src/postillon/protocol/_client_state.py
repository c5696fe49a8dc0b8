# THE STATE TRANSITION TABLE OF THE SMTP/LMTP CLIENT CORE LIVES IN THIS FILE, AND ONLY HERE.
#
# One table (h11 ``_state.py`` habit, as the server's ``_state.py``):
#
# * TRANSITIONS maps (state, trigger) to the next state. A missing entry means
#   the adapter called a command in a state that does not allow it: a
#   programming error, so ``transition()`` raises RuntimeError.
# * CLOSE (221, 421, EOF or a protocol violation) leads to CLOSED from every
#   state, so it has no rows.
#
# Which reply answers which command: ``ClientConnection`` keeps a queue of
# expected replies (several are outstanding with PIPELINING), each an
# ``Expect`` below, and hands every reply to the handler of its kind.
"""State table of the SMTP/LMTP client core (see the comment at the top)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TRANSITIONS", "TX_EXPECTS", "ClientState", "Expect", "Trigger", "transition"]


class ClientState(StrEnum):
    GREETING = "GREETING"  # waiting for the server's greeting
    GREETED = "GREETED"  # 220 received (or TLS established): send hello()
    HELLO = "HELLO"  # EHLO/HELO/LHLO sent
    READY = "READY"  # hello accepted, no transaction: commands may be sent
    COMMAND = "COMMAND"  # RSET or NOOP sent
    STARTTLS = "STARTTLS"  # STARTTLS sent
    TLS = "TLS"  # 220 to STARTTLS: handshake, then tls_established()
    AUTH = "AUTH"  # AUTH exchange in progress
    ENVELOPE = "ENVELOPE"  # MAIL/RCPT(/DATA) sent, replies outstanding
    BODY = "BODY"  # the adapter sends the message (send_body)
    BODY_END = "BODY_END"  # body ended (or failed): final replies outstanding
    QUIT = "QUIT"  # QUIT sent
    REFUSED = "REFUSED"  # greeting or hello refused, or RSET failed: only QUIT
    CLOSED = "CLOSED"  # 221, 421, EOF or protocol violation: close the socket


class Trigger(StrEnum):
    GREETING_OK = "GREETING_OK"
    GREETING_REFUSED = "GREETING_REFUSED"
    HELLO_SENT = "HELLO_SENT"
    HELLO_OK = "HELLO_OK"
    HELLO_REFUSED = "HELLO_REFUSED"
    COMMAND_SENT = "COMMAND_SENT"  # RSET, NOOP
    COMMAND_DONE = "COMMAND_DONE"
    STARTTLS_SENT = "STARTTLS_SENT"
    STARTTLS_READY = "STARTTLS_READY"
    STARTTLS_REFUSED = "STARTTLS_REFUSED"
    TLS_ESTABLISHED = "TLS_ESTABLISHED"
    AUTH_SENT = "AUTH_SENT"
    AUTH_DONE = "AUTH_DONE"
    MAIL_SENT = "MAIL_SENT"
    BODY_WANTED = "BODY_WANTED"
    BODY_ENDED = "BODY_ENDED"  # last piece sent, or a BDAT chunk refused
    TX_DONE = "TX_DONE"
    TX_BROKEN = "TX_BROKEN"  # the RSET after a failed transaction failed
    QUIT_SENT = "QUIT_SENT"
    CLOSE = "CLOSE"  # 221, 421, EOF, protocol violation: from any state


S = ClientState
_T = Trigger
TRANSITIONS: dict[tuple[ClientState, Trigger], ClientState] = {
    (S.GREETING, _T.GREETING_OK): S.GREETED,
    (S.GREETING, _T.GREETING_REFUSED): S.REFUSED,
    (S.GREETED, _T.HELLO_SENT): S.HELLO,
    (S.HELLO, _T.HELLO_OK): S.READY,
    (S.HELLO, _T.HELLO_REFUSED): S.REFUSED,
    (S.READY, _T.COMMAND_SENT): S.COMMAND,
    (S.COMMAND, _T.COMMAND_DONE): S.READY,
    (S.READY, _T.STARTTLS_SENT): S.STARTTLS,
    (S.STARTTLS, _T.STARTTLS_READY): S.TLS,
    (S.STARTTLS, _T.STARTTLS_REFUSED): S.READY,
    (S.TLS, _T.TLS_ESTABLISHED): S.GREETED,
    (S.READY, _T.AUTH_SENT): S.AUTH,
    (S.AUTH, _T.AUTH_DONE): S.READY,
    (S.READY, _T.MAIL_SENT): S.ENVELOPE,
    (S.ENVELOPE, _T.BODY_WANTED): S.BODY,
    (S.ENVELOPE, _T.TX_DONE): S.READY,
    (S.ENVELOPE, _T.TX_BROKEN): S.REFUSED,
    (S.BODY, _T.BODY_ENDED): S.BODY_END,
    (S.BODY_END, _T.TX_DONE): S.READY,
    (S.BODY_END, _T.TX_BROKEN): S.REFUSED,
    (S.GREETED, _T.QUIT_SENT): S.QUIT,
    (S.READY, _T.QUIT_SENT): S.QUIT,
    (S.REFUSED, _T.QUIT_SENT): S.QUIT,
}
# CLOSE leads to CLOSED from every state.


def transition(state: ClientState, trigger: Trigger) -> ClientState:
    if trigger is _T.CLOSE:
        return S.CLOSED
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise RuntimeError(f"not allowed in state {state.value} ({trigger.value})") from None


# --- what each outstanding reply answers ---------------------------------------------


class Expect(StrEnum):
    """What an outstanding reply answers."""

    GREETING = "GREETING"
    EHLO = "EHLO"
    HELO = "HELO"
    LHLO = "LHLO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DATA_END = "DATA_END"  # end of data; LMTP: one per accepted recipient
    EMPTY_END = "EMPTY_END"  # "." after a 354 that came with no recipient accepted
    BDAT = "BDAT"
    BDAT_LAST = "BDAT_LAST"  # LMTP: one per accepted recipient
    TX_RSET = "TX_RSET"  # the core's own RSET after a failed transaction
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


TX_EXPECTS = frozenset(
    {
        Expect.MAIL,
        Expect.RCPT,
        Expect.DATA,
        Expect.DATA_END,
        Expect.EMPTY_END,
        Expect.BDAT,
        Expect.BDAT_LAST,
        Expect.TX_RSET,
    }
)
