"""The SMTP/LMTP client session: a thin asyncio driver around ``ClientConnection``.

Design note (two minutes)
-------------------------
``protocol.client.ClientConnection`` knows the protocol (reply parsing,
pipelining, dot-stuffing, BDAT framing, LMTP replies); this module moves its
bytes over a socket, applies the RFC 5321 §4.5.3.2 timeouts, does the TLS
handshakes, and turns what goes wrong into :class:`SessionError`. One session
is one connection and may carry several transactions (``usable``).

The caller's contract, as one transaction (maddy delivery_target habit)::

    session = await SmtpClientSession.connect(host, 25, helo_name="mta.example")
    try:                                        # connect: greeting, EHLO, STARTTLS
        result = await session.send(sender, mail_params, recipients, body, size)
        # one final Reply per recipient, in input order
        if session.usable:
            ...                                 # another send() on the same connection
    except SessionError as exc:                 # the connection failed; exc.permanent says
        ...                                     # whether the host refused us for good;
    finally:                                    # exc.partial has the replies known so far
        await session.quit()

TLS (RFC 3207, RFC 7435, RFC 8314): ``starttls`` "opportunistic" uses STARTTLS
when offered, "required" fails without it; ``implicit_tls`` starts TLS at
connect (port 465). ``tls_check`` (the transport's, from its
``TlsRequirement``) judges the handshake; when it says no, the session QUITs
before AUTH or MAIL and raises SessionError. ``sock``: a TCP connection made
already (Happy Eyeballs and the source address, see ``happy_eyeballs``).
Every wait has a deadline: connect, greeting, each reply, each body write.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Literal

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.osutil.streams import write_nowait
from postillon.outbound.body_pieces import coalesce
from postillon.outbound.session_types import (
    TLS_POLICY_STATUS,
    ClientTimeouts,
    SessionError,
    TlsChecker,
    TransactionResult,
)
from postillon.outbound.tls import (
    AUTHENTICATED_RESULTS,
    default_client_context,
    peer_chain,
    recording_check,
    server_name,
)
from postillon.protocol.client import NEED_DATA, ClientConnection, ClientState
from postillon.protocol.client_events import (
    AuthReply,
    BodyRequested,
    ClientEvent,
    CommandReply,
    ConnectionClosed,
    Greeting,
    HelloAccepted,
    HelloRejected,
    ProtocolViolation,
    ServiceClosing,
    StartTlsReply,
    TransactionDone,
)

__all__ = [
    "TLS_POLICY_STATUS",
    "ClientTimeouts",
    "SessionError",
    "SmtpClientSession",
    "TlsChecker",
    "TransactionResult",
]


# Large enough to drain asyncio's reader buffer in one read (it pauses the
# transport at 2 x 64 KiB, plus one 256 KiB socket read): so the read that
# brings the 220 to STARTTLS leaves no plaintext behind for after the handshake.
READ_SIZE = 1 << 20
# Body pieces are joined to this before a write (a BDAT chunk): fewer syscalls.
BODY_CHUNK = 64 * 1024
# With PIPELINING, at most this many BDAT chunk replies outstanding: the
# replies must be read before they fill the server's send buffer.
BDAT_WINDOW = 16
# How long to collect a reply sent before a write failed (an early 552 in DATA).
SALVAGE_TIMEOUT = 2.0
DEFAULT_TIMEOUTS = ClientTimeouts()


class SmtpClientSession:
    """One SMTP/LMTP connection to a server; see the module note for the contract."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: ClientConnection,
        *,
        peer: str,
        timeouts: ClientTimeouts,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self.peer = peer
        self.timeouts = timeouts
        self.tls = ""
        self.tls_verified = False
        self.tls_result = "none"  # TlsCheck.result once TLS is up
        self.messages_sent = 0  # transactions whose body was sent
        self._closed = False
        self._broken = False  # e.g. RSET failed: no more transactions
        self._reason = ""  # why the driver gave up on the connection (timeout, I/O error)
        self._stash: deque[ClientEvent] = deque()
        self._read_task: asyncio.Future[bytes] | None = None
        # Called once when the connection closes (the transport's metrics).
        self.on_close: Callable[[], None] | None = None

    # --- connecting --------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        helo_name: str,
        lmtp: bool = False,
        starttls: Literal["none", "opportunistic", "required"] = "opportunistic",
        tls_context: ssl.SSLContext | None = None,
        tls_check: TlsChecker | None = None,
        implicit_tls: bool = False,
        server_hostname: str | None = None,
        unix_path: str | None = None,
        local_address: str | None = None,
        sock: socket.socket | None = None,
        timeouts: ClientTimeouts = DEFAULT_TIMEOUTS,
        use_pipelining: bool = True,
        use_chunking: bool = True,
    ) -> SmtpClientSession:
        """Connect, read the greeting, say EHLO/LHLO, and do STARTTLS per ``starttls``."""
        name = server_hostname if server_hostname is not None else server_name(host)
        ctx = tls_context or default_client_context()
        where = f"unix:{unix_path}" if unix_path else f"{host}:{port}"
        try:
            async with asyncio.timeout(timeouts.connect):
                if unix_path:
                    reader, writer = await asyncio.open_unix_connection(
                        unix_path,
                        ssl=ctx if implicit_tls else None,
                        server_hostname=(name or "") if implicit_tls else None,
                    )
                elif sock is not None:  # connected already (Happy Eyeballs, egress)
                    reader, writer = await asyncio.open_connection(
                        sock=sock,
                        ssl=ctx if implicit_tls else None,
                        server_hostname=(name or "") if implicit_tls else None,
                    )
                else:
                    reader, writer = await asyncio.open_connection(
                        host,
                        port,
                        ssl=ctx if implicit_tls else None,
                        server_hostname=(name or "") if implicit_tls else None,
                        local_addr=(local_address, 0) if local_address else None,
                    )
        except TimeoutError:
            raise SessionError(f"connect to {where}: timeout after {timeouts.connect}s") from None
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS failure
            raise SessionError(f"connect to {where} failed: {exc}") from exc
        peername = writer.get_extra_info("peername")
        if unix_path:
            peer = f"unix:{unix_path}"
        elif isinstance(peername, tuple):
            peer = f"{host}[{peername[0]}]:{peername[1]}"
        else:
            peer = f"{host}:{port}"
        conn = ClientConnection(
            helo_name, lmtp=lmtp, use_pipelining=use_pipelining, use_chunking=use_chunking
        )
        session = cls(reader, writer, conn, peer=peer, timeouts=timeouts)
        try:
            if implicit_tls:
                await session._tls_done(ctx, name, tls_check)
            await session._open(starttls if not implicit_tls else "none", ctx, name, tls_check)
        except BaseException:
            session.close()
            raise
        return session

    async def _open(
        self, starttls: str, ctx: ssl.SSLContext, name: str | None, check: TlsChecker | None
    ) -> None:
        event = await self._next()
        assert isinstance(event, Greeting), event
        if event.reply.code != 220:
            await self._refused("greeting", event.reply)
        await self._hello()
        if starttls == "none":
            return
        if "STARTTLS" not in self._conn.extensions:
            if starttls == "required":
                await self.quit()
                raise SessionError(
                    f"TLS required but {self.peer} does not offer STARTTLS",
                    status=TLS_POLICY_STATUS,
                    tls_result="starttls-not-supported",
                )
            return
        self._conn.starttls()
        event = await self._next()
        assert isinstance(event, StartTlsReply), event
        if not event.ready:
            if starttls == "required":
                await self.quit()
                raise SessionError(
                    "TLS required but STARTTLS was refused",
                    reply=event.reply,
                    tls_result="starttls-refused",
                )
            return  # opportunistic: go on in plaintext
        await self._flush(self.timeouts.command)
        try:
            async with asyncio.timeout(self.timeouts.command):
                await self._writer.start_tls(ctx, server_hostname=name or "")
        except TimeoutError:
            self.close()
            raise SessionError(
                f"TLS handshake with {self.peer}: timeout", tls_result="handshake-failed"
            ) from None
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.close()
            raise SessionError(
                f"TLS handshake with {self.peer} failed: {exc}", tls_result="handshake-failed"
            ) from exc
        await self._tls_done(ctx, name, check)
        self._conn.tls_established()
        await self._hello()

    async def _hello(self) -> None:
        self._conn.hello()
        event = await self._next()
        if isinstance(event, HelloRejected):
            await self._refused("hello", event.reply)
        assert isinstance(event, HelloAccepted), event

    async def _refused(self, what: str, reply: Reply) -> None:
        """The server refused the session: QUIT politely (unless it closed), raise."""
        await self.quit()
        raise SessionError(
            f"{self.peer} refused the {what}", reply=reply, permanent=reply.code >= 500
        )

    async def _tls_done(
        self, ctx: ssl.SSLContext, name: str | None, check: TlsChecker | None
    ) -> None:
        """Record the TLS session; when ``check`` refuses it, QUIT and raise."""
        obj = self._writer.get_extra_info("ssl_object")
        if obj is None:
            return
        cipher = obj.cipher()
        self.tls = f"{obj.version() or 'TLS'} {cipher[0]}" if cipher else (obj.version() or "TLS")
        result = (check or recording_check(ctx, name))(peer_chain(obj))
        self.tls_verified = result.verified
        self.tls_result = result.result
        if not result.ok:
            # Nothing more is said on this connection: no AUTH, no MAIL.
            await self.quit()
            raise SessionError(
                result.reason, status=TLS_POLICY_STATUS, tls_result=result.result, tls=self.tls
            )

    # --- the public API ------------------------------------------------------------------

    @property
    def extensions(self) -> Mapping[str, str]:
        return self._conn.extensions

    @property
    def usable(self) -> bool:
        """Another transaction may be sent on this connection.

        An idle connection the server has closed, or on which it said anything
        (an unsolicited 421 "idle timeout"), is not: checked without reading.
        """
        if self._closed or self._broken or self._conn.state is not ClientState.READY:
            return False
        if self._read_task is not None and self._read_task.done():
            return False  # idle, yet the server sent something or closed
        return not self._reader.at_eof()

    async def authenticate(self, username: str, password: str) -> None:
        """AUTH PLAIN, else LOGIN, as offered; only over TLS whose check proved
        the server's identity (``tls_result`` verified or pinned).

        A refusal is temporary even when the server says 535: a wrong password
        is an operator's problem, not a reason to bounce mail (Postfix
        smtp_sasl_auth_soft_bounce).
        """
        if not self.tls:
            raise SessionError("AUTH refused by the client: the connection is not encrypted")
        if self.tls_result not in AUTHENTICATED_RESULTS:
            # Never a password to a server that has not proved who it is.
            raise SessionError(
                f"AUTH refused by the client: {self.peer} did not prove its identity "
                f"(certificate {self.tls_result})",
                status=TLS_POLICY_STATUS,
            )
        self._check_usable()
        mechanisms = self._conn.extensions.auth_mechanisms
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in mechanisms), None)
        if mechanism is None:
            offered = " ".join(sorted(mechanisms)) or "none"
            raise SessionError(f"{self.peer} offers no usable AUTH mechanism ({offered})")
        self._conn.auth(mechanism, username, password)
        event = await self._next()
        assert isinstance(event, AuthReply), event
        if not event.ok:
            if self._conn.closing:
                self.close()
            raise SessionError(f"AUTH {mechanism} failed", reply=event.reply)

    async def send(
        self,
        sender: str,
        mail_params: MailParams,
        recipients: Sequence[tuple[str, RcptParams]],
        body: AsyncIterator[bytes],
        size: int,
        *,
        needs_smtputf8: bool = False,
        smtputf8: bool = False,
        eight_bit: bool = False,
    ) -> TransactionResult:
        """One transaction; the final reply for every recipient, in input order.

        ``body`` is the message with CRLF line endings, as stored (not yet
        dot-stuffed). Raises SessionError when the connection breaks (with
        ``partial``); a 421 is a normal result (every unanswered recipient gets
        it) after which ``usable`` is False.
        """
        self._check_usable()
        self._conn.start_transaction(
            sender,
            mail_params,
            recipients,
            size=size,
            eight_bit=eight_bit,
            needs_smtputf8=needs_smtputf8,
            smtputf8=smtputf8,
        )
        body_sent = False
        done: TransactionDone | None = None
        try:
            while done is None:
                event = await self._next(in_transaction=True)
                if isinstance(event, BodyRequested):
                    body_sent = True
                    await self._send_body(body)
                elif isinstance(event, TransactionDone):
                    done = event
        except SessionError:
            raise
        except BaseException:
            # The body iterator failed (storage), or we were cancelled: the server is
            # somewhere inside the transaction, so this connection cannot go on.
            self.close()
            raise
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if body_sent:
            self.messages_sent += 1
        result = TransactionResult(done.per_recipient, done.mail_reply)
        if done.interrupted:
            detail = self._reason or f"connection to {self.peer} broken: {done.interrupted}"
            self.close()
            raise SessionError(detail, partial=result)
        if self._conn.closing:
            self.close()
        return result

    async def reset(self) -> None:
        """RSET; a refusal makes the session unusable (and raises)."""
        self._check_usable()
        self._conn.rset()
        event = await self._next()
        assert isinstance(event, CommandReply), event
        if event.reply.code >= 400:
            self._broken = True
            if self._conn.closing:
                self.close()
            raise SessionError("RSET refused", reply=event.reply)

    async def quit(self) -> None:
        """QUIT and close; never raises (a server that does not answer is closed anyway)."""
        if self._closed:
            return
        try:
            if self._conn.state in (ClientState.GREETED, ClientState.READY, ClientState.REFUSED):
                self._conn.quit()
                while not self._conn.closing:
                    event = await self._next()
                    if isinstance(event, CommandReply) and event.verb == "QUIT":
                        break
        except (SessionError, OSError, RuntimeError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close()
        task, self._read_task = self._read_task, None
        if task is not None:
            if task.done():
                if not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning
            else:
                task.cancel()
        self._writer.close()

    # --- internals ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if not self.usable:
            raise SessionError(f"connection to {self.peer} is not usable any more")

    async def _send_body(self, body: AsyncIterator[bytes]) -> None:
        """Stream the body: every piece but the last as soon as the next one exists."""
        conn = self._conn
        held: bytes | None = None
        async for piece in coalesce(body, BODY_CHUNK):
            if held is not None:
                if not await self._body_slot():
                    return
                conn.send_body(held)
                await self._flush(self.timeouts.data_block)
            held = piece
        if not await self._body_slot():
            return
        conn.send_body(held or b"", last=True)
        await self._flush(self.timeouts.data_block)

    async def _body_slot(self) -> bool:
        """Wait until send_body may be called; False when the body is no longer wanted."""
        conn = self._conn
        while conn.body_wanted and not self._closed:
            # Replies that already arrived first (an early refusal stops the body),
            # keeping one read pending meanwhile.
            self._start_read()
            self._poll_read()
            event = conn.next_event()
            if event is NEED_DATA:
                if conn.can_send_body and conn.pending_replies < BDAT_WINDOW:
                    return True
                event = await self._next(in_transaction=True)
            if isinstance(event, TransactionDone):
                self._stash.append(event)
                return False
        return False

    async def _next(self, *, in_transaction: bool = False) -> ClientEvent:
        """The next event, reading (and flushing) as needed under the phase's deadline.

        Outside a transaction a closed or broken connection raises SessionError;
        inside one the core reports it with ``TransactionDone.interrupted``.
        """
        if self._stash:
            return self._stash.popleft()
        conn = self._conn
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ClientEvent)
                if isinstance(event, ConnectionClosed | ProtocolViolation | ServiceClosing):
                    self.close()
                    raise self._error(event)
                return event
            if conn.closing:  # nothing more will come (defensive: the core says why first)
                self.close()
                raise SessionError(self._reason or f"connection to {self.peer} closed")
            timeout = self._phase_timeout()
            await self._flush(self.timeouts.command)
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + timeout
            await self._read(deadline, timeout)

    def _error(self, event: ClientEvent) -> SessionError:
        if isinstance(event, ServiceClosing):
            return SessionError(f"{self.peer} closed the session", reply=event.reply)
        if isinstance(event, ProtocolViolation):
            return SessionError(f"protocol error from {self.peer}: {event.detail}")
        assert isinstance(event, ConnectionClosed)
        return SessionError(self._reason or f"{self.peer} closed the connection ({event.detail})")

    def _phase_timeout(self) -> float:
        state = self._conn.state
        if state is ClientState.GREETING:
            return self.timeouts.greeting
        if state is ClientState.BODY_END:
            return self.timeouts.data_end
        return self.timeouts.command

    def _start_read(self) -> asyncio.Future[bytes]:
        """The one pending read on the socket (started if there is none)."""
        if self._read_task is None:
            self._read_task = asyncio.ensure_future(self._reader.read(READ_SIZE))
        return self._read_task

    def _poll_read(self) -> None:
        """Feed the pending read's bytes to the core if it has completed; never waits.

        A read kept pending while the body is written sees a reply the moment it
        arrives - before a reset from the server could hide it (asyncio's
        StreamReader raises the error ahead of data still buffered).
        """
        task = self._read_task
        if task is None or not task.done():
            return
        self._read_task = None
        if task.cancelled():
            self._give_up(self._reason or "read cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self._give_up(f"connection to {self.peer} failed: {exc}")
            return
        self._conn.receive_data(task.result())

    async def _read(self, deadline: float, timeout: float) -> None:
        if self._closed:
            self._give_up(self._reason or "connection closed")
            return
        task = self._start_read()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait({task})
        except TimeoutError:
            self._give_up(
                f"timeout ({timeout:g}s) waiting for {self.peer} in state {self._conn.state.value}"
            )
            return
        self._poll_read()

    async def _flush(self, timeout: float) -> None:
        if not (data := self._conn.data_to_send()) or self._closed:
            return
        try:
            if not write_nowait(self._writer, data):  # else all sent: no timer to arm
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError:
            self._give_up(f"timeout ({timeout:g}s) sending to {self.peer}")
        except OSError as exc:
            await self._salvage()
            self._give_up(f"connection to {self.peer} failed while sending: {exc}")

    async def _salvage(self) -> None:
        """After a failed write: feed what the server said before it went away."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SALVAGE_TIMEOUT):
                while not self._closed:
                    await asyncio.wait({self._start_read()})
                    self._poll_read()

    def _give_up(self, reason: str) -> None:
        """The connection is dead: tell the core (as EOF) and close the socket."""
        if not self._reason:
            self._reason = reason
        self._conn.receive_data(b"")
        self.close()
