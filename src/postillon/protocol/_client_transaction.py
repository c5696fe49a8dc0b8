"""The mail transaction of ``ClientConnection``: its state, and the replies that move it.

Connection state and transaction state are separate objects (OpenSMTPD
``smtp_session`` vs ``smtp_tx``): :class:`Transaction` lives from MAIL to the
last final reply. :class:`TransactionReplies` is the part of
``ClientConnection`` that answers MAIL, RCPT, DATA, BDAT and end-of-data
replies, sends what follows from them (the next RCPT without PIPELINING, DATA,
the RSET after a failure) and ends the transaction with ``TransactionDone``.
It is a mixin so that the connection keeps one set of buffers and one state;
the attributes it uses are declared below and set by ``ClientConnection``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from postillon.core.reply import Reply
from postillon.protocol._client_state import ClientState, Expect, Trigger, transition
from postillon.protocol._writers import BodyEncoder
from postillon.protocol.client_events import (
    BodyRequested,
    ChunkReply,
    ClientEvent,
    MailReply,
    RcptReply,
    TransactionDone,
)
from postillon.protocol.errors import ClientProtocolError

__all__ = ["LOST_REPLY", "Transaction", "TransactionReplies"]

CRLF = b"\r\n"
LOST_REPLY = Reply.of(451, "4.4.2", "Connection lost before the server answered")
S = ClientState


@dataclass(slots=True)
class Transaction:
    """One mail transaction (OpenSMTPD smtp_tx): MAIL to the last final reply."""

    count: int
    pipelined: bool
    bdat: bool
    binary: bool
    to_send: deque[bytes]  # RCPT lines still to send one by one (no PIPELINING)
    mail_reply: Reply | None = None
    final: list[Reply | None] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # indices, in acceptance order
    failure: Reply | None = None  # what ended it early (MAIL, DATA, a BDAT chunk)
    lmtp_next: int = 0  # next accepted recipient to get an LMTP end-of-data reply
    outstanding_chunks: int = 0
    deferred_last: bytes | None = None  # LMTP: LAST chunk waiting for earlier chunk replies
    data_pipelined: bool = False

    @property
    def mail_ok(self) -> bool:
        return self.mail_reply is not None and self.mail_reply.code < 400

    def result(self, fallback: Reply) -> tuple[Reply, ...]:
        return tuple(r if r is not None else fallback for r in self.final)


class TransactionReplies:
    """Mixin of ``ClientConnection``: output primitives and the transaction's replies."""

    # Set by ClientConnection.__init__.
    lmtp: bool
    _state: ClientState
    _out: bytearray
    _events: deque[ClientEvent]
    _expect: deque[tuple[Expect, int]]
    _tx: Transaction | None
    _encoder: BodyEncoder | None
    _body_octets: int

    # --- output ------------------------------------------------------------

    def _command(self, line: str, kind: Expect) -> None:
        self._out += line.encode("utf-8") + CRLF
        self._expect.append((kind, 0))

    def _end_body(self) -> None:
        self._state = transition(self._state, Trigger.BODY_ENDED)
        self._encoder = None

    def _send_last(self, frame: bytes) -> None:
        tx = self._tx
        assert tx is not None
        self._out += frame
        self._body_octets += len(frame)
        for _ in tx.accepted if self.lmtp else (0,):
            self._expect.append((Expect.BDAT_LAST, 0))

    # --- replies in a transaction ---------------------------------------------------------

    def _on_mail(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.mail_reply = reply
        self._events.append(MailReply(reply))
        if reply.code >= 400:
            tx.failure = reply
            if not tx.pipelined:
                self._finish(reply)  # nothing else was sent
        elif reply.code >= 300:
            raise ClientProtocolError(f"unexpected reply to MAIL: {reply}")
        elif tx.to_send:
            self._send_next_rcpt()

    def _send_next_rcpt(self) -> None:
        """Without PIPELINING: the next RCPT once the previous command is answered."""
        tx = self._tx
        assert tx is not None
        self._out += tx.to_send.popleft()
        self._expect.append((Expect.RCPT, tx.count - len(tx.to_send) - 1))

    def _on_rcpt(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to RCPT: {reply}")
        self._events.append(RcptReply(index, reply))
        if not tx.mail_ok:
            pass  # MAIL was refused: its reply is every recipient's (see _finish)
        elif reply.code < 300:
            tx.accepted.append(index)
        else:
            tx.final[index] = reply
        if tx.to_send:
            self._send_next_rcpt()
        elif index == tx.count - 1 and not tx.data_pipelined:
            self._envelope_done()

    def _envelope_done(self) -> None:
        """Every RCPT is answered and DATA was not pipelined."""
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # MAIL refused (pipelined)
            self._finish(tx.failure)
        elif not tx.accepted:
            self._finish_with_rset(None)
        elif tx.bdat:
            self._want_body(None)
        else:
            self._command("DATA", Expect.DATA)

    def _on_data(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # MAIL refused: this is its 503 (or worse)
            if reply.code == 354:
                self._command_raw(b".\r\n", Expect.EMPTY_END)
                return
            self._finish(tx.failure)
        elif reply.code == 354:
            if tx.accepted:
                self._want_body(reply)
            else:  # RFC 2920 §3.1: a 354 despite no recipient; send an empty message
                self._command_raw(b".\r\n", Expect.EMPTY_END)
        elif reply.code >= 400:
            tx.failure = reply
            self._finish_with_rset(reply)
        else:
            raise ClientProtocolError(f"unexpected reply to DATA: {reply}")

    def _on_empty_end(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        self._finish(tx.failure or reply)

    def _want_body(self, reply: Reply | None) -> None:
        tx = self._tx
        assert tx is not None
        self._encoder = BodyEncoder(stuff=not tx.bdat, fix_line_endings=not tx.binary)
        self._state = transition(self._state, Trigger.BODY_WANTED)
        self._events.append(BodyRequested(reply))

    def _on_message_reply(self, reply: Reply) -> None:
        """The reply to the end of data (SMTP), or one of the per-recipient ones (LMTP)."""
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to the end of data: {reply}")
        if self.lmtp:
            tx.final[tx.accepted[tx.lmtp_next]] = reply
            tx.lmtp_next += 1
            if tx.lmtp_next < len(tx.accepted):
                return
        else:
            for i in tx.accepted:
                tx.final[i] = reply
        self._finish(reply)

    def _on_data_end(self, reply: Reply, _: int) -> None:
        self._on_message_reply(reply)

    def _on_bdat(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.outstanding_chunks -= 1
        self._events.append(ChunkReply(reply))
        if reply.code >= 300 and tx.failure is None:
            # RFC 3030 §3: a refused chunk fails the transaction; no more chunks.
            tx.failure = reply
            if self._state is S.BODY:
                self._end_body()
        if tx.outstanding_chunks:
            return
        if tx.failure is not None:
            tx.deferred_last = None
            if (
                not any(k is Expect.BDAT_LAST for k, _ in self._expect)
                and self._state is S.BODY_END
            ):
                self._finish_with_rset(tx.failure)
        elif tx.deferred_last is not None:
            frame, tx.deferred_last = tx.deferred_last, None
            self._send_last(frame)

    def _on_bdat_last(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # a chunk was refused; this LAST only confirms it
            self._finish_with_rset(tx.failure)
        else:
            self._on_message_reply(reply)

    def _on_tx_rset(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if reply.code >= 400:  # the server is in an unknown state: only QUIT now
            self._finish(tx.failure or reply, broken=True)
        else:
            self._finish(tx.failure or reply)

    # --- internals: ending a transaction -----------------------------------------------

    def _command_raw(self, data: bytes, kind: Expect) -> None:
        self._out += data
        self._expect.append((kind, 0))

    def _finish_with_rset(self, failure: Reply | None) -> None:
        """A transaction failed after MAIL was accepted: RSET, then TransactionDone."""
        tx = self._tx
        assert tx is not None
        if failure is not None:
            tx.failure = failure
        elif tx.failure is None:
            tx.failure = next((r for r in tx.final if r is not None), None)
        if tx.mail_ok:
            self._command("RSET", Expect.TX_RSET)
        else:
            self._finish(tx.failure or LOST_REPLY)

    def _finish(self, fallback: Reply, *, interrupted: str = "", broken: bool = False) -> None:
        tx = self._tx
        assert tx is not None
        self._tx = None
        self._encoder = None
        self._events.append(TransactionDone(tx.mail_reply, tx.result(fallback), interrupted))
        if self._state is not S.CLOSED:
            self._state = transition(self._state, Trigger.TX_BROKEN if broken else Trigger.TX_DONE)
