"""The message content on the server side: DATA and BDAT bodies, and the transaction.

The part of ``ServerConnection`` that reads a message once it is admitted: the
DATA body after 354 (``_readers.DataReader``) and BDAT chunks (RFC 3030:
``_readers.ChunkReader``; the first chunk of a transaction is a
``DataRequested`` decision, the following ones are answered by the core), the
size limit across chunks (RFC 1870), and the end: ``MessageComplete`` (LMTP:
one answer per accepted recipient) or ``MessageAborted``. A refused BDAT still
consumes its announced octets, so the session stays in step with the client.

A mixin, so the connection keeps one receive buffer, one event queue and one
state; the attributes it uses are declared below and set by
``ServerConnection``. :class:`Transaction` is the transaction's own state
(OpenSMTPD ``smtp_tx``), apart from the connection's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postillon.core.address import Address
from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol._readers import BdatBody, ChunkReader, DataReader
from postillon.protocol._state import Command, State, Trigger, transition
from postillon.protocol.commands import BdatCommand, parse_bdat
from postillon.protocol.errors import ProtocolError
from postillon.protocol.events import (
    BodyData,
    DataRequested,
    Event,
    MessageAborted,
    MessageComplete,
)
from postillon.protocol.settings import ServerSettings

__all__ = ["MessageContent", "Transaction"]


@dataclass(slots=True)
class Transaction:
    """One mail transaction (OpenSMTPD smtp_tx): from MAIL to the end of the message."""

    sender: Address | None
    params: MailParams
    accepted: int = 0  # recipients the adapter answered with 2xx
    bdat: BdatBody | None = None  # set by the first accepted BDAT chunk

    @property
    def bdat_size(self) -> int:
        return self.bdat.size if self.bdat is not None else 0


class MessageContent:
    """Mixin of ``ServerConnection``: DATA and BDAT content, and the end of a message."""

    # Set by ServerConnection.__init__.
    settings: ServerSettings
    closing: bool
    _state: State
    _in: bytearray
    _events: deque[Event]
    _txn: Transaction | None
    _body: DataReader | None
    _chunk: ChunkReader | None
    _pending_bdat: BdatCommand | None
    _replies_due: int

    if TYPE_CHECKING:  # provided by ServerConnection

        def _check(self, command: Command) -> None: ...

        def _send(self, reply: Reply) -> None: ...

        def _reset(self, *, announce: bool) -> None: ...

        def _check_error_limit(self) -> None: ...

    def _cmd_bdat(self, verb: str, args: str) -> None:
        cmd = parse_bdat(args)  # on a syntax error the count is unknown: nothing consumed
        try:
            if not self.settings.chunking:
                raise ProtocolError(R.NOT_IMPLEMENTED)
            self._check(Command.BDAT)
        except ProtocolError:
            self._chunk = ChunkReader(cmd.size, cmd.last, None)  # stay in sync
            raise
        txn = self._txn
        assert txn is not None
        limit = self.settings.max_message_size
        if limit and txn.bdat_size + cmd.size > limit:
            # RFC 1870 across chunks: consume the chunk, then refuse the message.
            self._chunk = ChunkReader(cmd.size, cmd.last, None, R.MESSAGE_TOO_BIG)
        elif self._state is State.RCPT:
            self._pending_bdat = cmd
            self._events.append(DataRequested())
        else:
            self._start_chunk(cmd)

    def _answer_bdat(self, cmd: BdatCommand, reply: Reply) -> None:
        """The answer to the first BDAT of a transaction (RFC 3030 §2)."""
        self._pending_bdat = None
        if reply.code < 400:  # go: the core answers the chunk itself
            self._state = transition(self._state, Trigger.BDAT_ACCEPTED)
            self._start_chunk(cmd)
            return
        self._send(reply)
        if not self.closing:
            self._chunk = ChunkReader(cmd.size, cmd.last, None)  # still consumed
            self._reset(announce=True)  # a failed BDAT fails the transaction

    def _step_body(self) -> bool:
        body = self._body
        assert body is not None
        data, done = body.read(self._in)
        if data:
            self._events.append(BodyData(data))
        if not done:
            return bool(data)
        self._body = None
        if body.failure is not None:
            self._abort_message(body.failure, final=True)
        else:
            self._message_complete(body.size)
        self._check_error_limit()
        return True

    def _step_chunk(self) -> bool:
        chunk = self._chunk
        assert chunk is not None
        data, done = chunk.read(self._in)
        if data:
            self._events.append(BodyData(data))
        if not done:
            return bool(data)
        self._chunk = None
        body = chunk.body
        if body is None:
            if chunk.refusal is not None:  # a chunk over the size limit, now consumed
                self._abort_message(chunk.refusal, final=chunk.last)
                self._check_error_limit()
            return True  # a refused chunk, now consumed
        if chunk.last:
            body.finish()
        if body.failure is not None:
            self._abort_message(body.failure, final=chunk.last)
        elif chunk.last:
            self._message_complete(body.size)
        else:
            self._send(R.chunk_received(chunk.size))
        self._check_error_limit()
        return True

    def _start_chunk(self, cmd: BdatCommand) -> None:
        txn = self._txn
        assert txn is not None
        if txn.bdat is None:
            txn.bdat = BdatBody()
        self._chunk = ChunkReader(cmd.size, cmd.last, txn.bdat)

    def _message_complete(self, size: int) -> None:
        txn = self._txn
        assert txn is not None
        lmtp = self.settings.lmtp
        self._replies_due = txn.accepted if lmtp else 1
        self._events.append(MessageComplete(size, txn.accepted if lmtp else None))

    def _abort_message(self, reply: Reply, *, final: bool) -> None:
        """Refuse the message: one reply, or one per recipient after LMTP's end of data."""
        txn = self._txn
        count = txn.accepted if txn is not None and final and self.settings.lmtp else 1
        for _ in range(count):
            self._send(reply)
        self._events.append(MessageAborted(reply))
        self._txn = None
        trigger = Trigger.MESSAGE_DONE if self._state is State.DATA else Trigger.RESET
        if not self.closing:
            self._state = transition(self._state, trigger)
