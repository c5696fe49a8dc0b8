"""The SMTP/LMTP protocol, without I/O (DESIGN.md principle 1: the protocol is pure).

Design note (two minutes)
-------------------------
``ServerConnection`` (server.py) is a state machine in the style of h11: the
adapter feeds it the peer's bytes (``receive_data``), pulls ``Event`` values
(``next_event``) until it gets the ``NEED_DATA`` sentinel, answers each
*decision* event (Hello, MailFrom, RcptTo, DataRequested, StartTlsRequested,
MessageComplete) with ``reply()``/``accept_hello()``, and writes what
``data_to_send()`` returns. No sockets, asyncio, clock, logging or config here:
everything is testable byte by byte, and fuzzable.

Where things live:

* ``_state.py`` - THE state table: states, which command is admissible where,
  and every transition. Read it first.
* ``_readers.py`` - framing: command lines (length limit, RFC 5321 §4.5.3.1),
  the DATA body (end marker, dot-unstuffing) and BDAT chunks. Body readers
  search whole chunks (``find``/``count``) and keep at most four octets across
  chunk boundaries; a huge body streams through in the pieces it arrives in.
* ``commands.py`` - argument parsing: hello names, paths and ESMTP parameters
  into ``core.envelope`` values.
* ``_server_message.py`` - the transaction, DATA and BDAT content, and the end
  of a message; ``_server_auth.py`` - AUTH and the SASL exchange (``sasl.py``
  has the mechanisms). Both are parts of ``ServerConnection`` (mixins).
* ``extensions.py`` - the EHLO keyword list; ``replies.py`` - every reply the
  core sends itself; ``events.py``; ``settings.py``; ``errors.py``.

``ClientConnection`` (client.py) is the same kind of machine for the other
side (events in ``client_events.py``):

* ``_client_state.py`` - THE client state table, and what each outstanding
  reply answers.
* ``_reply_reader.py`` - the server's replies into ``Reply`` values (multi-line,
  enhanced status codes, line and count limits).
* ``_writers.py`` - what the client writes: MAIL/RCPT with their parameters,
  and the body (CRLF repair, dot-stuffing) streaming across pieces.
* ``_client_transaction.py`` - the transaction's state and the replies that
  move it (MAIL to the last final reply).

``MilterClient`` (milter.py) is the MTA side of the Sendmail/Postfix milter protocol
(version 6, as libmilter speaks it), the same kind of machine: ``milter_wire.py``
has the framing, libmilter's constants and the events; the asyncio driver is
``checks/milter_driver.py``.

Rules kept everywhere:

* One error type inside (``ProtocolError``, carrying its reply), turned into a
  reply and a ``CommandRejected`` event where the peer's bytes enter.
* Strict line discipline against smuggling: only CRLF ends a line; a bare CR or
  LF or a NUL is refused in commands (500 5.5.2) and in message content (550
  5.6.0 after the *real* end marker, so the session stays in sync). An
  overlong command line is discarded up to its CRLF and answered once.
* Every refused BDAT still consumes its announced octets; after a 220 to
  STARTTLS every buffered byte is dropped (CVE-2011-0411).
* Replies are queued in command order into one output buffer, so pipelined
  answers go out in one write (RFC 2920).
* Connection state (``ServerConnection``) and transaction state
  (``_Transaction``) are separate objects.
"""

from postillon.protocol.errors import ProtocolError
from postillon.protocol.events import (
    NEED_DATA,
    BodyData,
    CommandRejected,
    ConnectionClosed,
    DataRequested,
    Decision,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageComplete,
    QuitRequested,
    RcptTo,
    StartTlsRequested,
    TooManyErrors,
    TransactionReset,
)
from postillon.protocol.server import ServerConnection, ServerSettings, State

__all__ = [
    "NEED_DATA",
    "BodyData",
    "CommandRejected",
    "ConnectionClosed",
    "DataRequested",
    "Decision",
    "Event",
    "Hello",
    "MailFrom",
    "MessageAborted",
    "MessageComplete",
    "ProtocolError",
    "QuitRequested",
    "RcptTo",
    "ServerConnection",
    "ServerSettings",
    "StartTlsRequested",
    "State",
    "TooManyErrors",
    "TransactionReset",
]
