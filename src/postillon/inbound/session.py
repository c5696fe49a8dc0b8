"""The session driver: a thin asyncio adapter around ``ServerConnection``.

It moves bytes between the socket and the sans-IO core, applies timeouts, and
turns the core's decision events into calls on policy (``RelayPolicy``) and
intake. Connection state (peer, TLS, HELO name) lives here; transaction state
lives in the ``IntakeTransaction`` (OpenSMTPD's smtp_session vs smtp_tx).

Replies are written whenever the core needs more input, so pipelined commands
(RFC 2920) get their replies in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace

from postillon.checks.authentication import (
    VERIFY_BUSY,
    InboundAuthentication,
    MessageFacts,
    VerifyBusy,
)
from postillon.checks.authresults import strip_own_results
from postillon.checks.rate_limit import SubmissionRateLimits
from postillon.checks.relay import RelayPolicy
from postillon.checks.sender_policy import (
    SenderMode,
    check_from_header,
    check_mail_from,
    from_header_values,
)
from postillon.config.model import LimitsConfig
from postillon.core.account import Account, ScramCredentials
from postillon.core.address import Address
from postillon.core.envelope import NewRecipient, RcptParams
from postillon.core.recipient import RecipientAccepted
from postillon.core.reply import SHUTTING_DOWN, TEMP_LOCAL_ERROR, TIMEOUT, Reply
from postillon.inbound.auth import Authenticator
from postillon.inbound.tls import describe as describe_tls
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake, IntakeError, IntakeTransaction
from postillon.observability.maillog import MailLog
from postillon.observability.metrics import (
    ListenerMetrics,
    reject_reason_for_commit,
    reject_reason_for_recipient,
)
from postillon.protocol import events as ev
from postillon.protocol import replies as R
from postillon.protocol.server import (
    BUILTIN_MECHANISMS,
    NEED_DATA,
    ServerConnection,
    ServerSettings,
)

READ_SIZE = 256 * 1024
# RFC 5321 3.8: 421 when the service cannot go on; 4.3.0: a mail system problem.
QUEUE_UNAVAILABLE = Reply.of(421, "4.3.0", "Queue temporarily unavailable, try again later")
CLOSE_TIMEOUT = 2.0
LOCAL_IO_ERROR = Reply.of(421, "4.3.0", "Local error, closing connection; try again later")
_LOG_NAME = 64  # characters of a client-supplied username kept in the log


def _loggable_name(name: str) -> str:
    """A username as the client typed it, safe for a log line."""
    short = name[:_LOG_NAME] + ("..." if len(name) > _LOG_NAME else "")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in short)


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """What every session of one listener shares."""

    settings: ServerSettings
    intake: Intake
    relay: RelayPolicy
    maillog: MailLog
    limits: LimitsConfig
    listener: str
    tls_context: ssl.SSLContext | None = None
    # SMTP AUTH (RFC 4954): None = no AUTH offered on this listener, whatever
    # settings.auth_mechanisms says.
    auth: Authenticator | None = None
    # Submission policy (RFC 6409): applies to authenticated clients and to
    # every session of a submission listener.
    submission: bool = False
    sender_policy: SenderMode = "enforce"
    rate_limits: SubmissionRateLimits | None = None
    hide_client_ip: bool = True
    recipient_delimiter: str = "+"
    # False while a shared queue's database is unreachable: then the session
    # answers 421 4.3.0 (greeting, MAIL) instead of a 250 it could not keep.
    queue_available: Callable[[], bool] | None = None
    # SPF/DKIM/DMARC/ARC at end of data; None = no checks on this listener.
    authentication: InboundAuthentication | None = None
    metrics: ListenerMetrics | None = None


class Session:
    def __init__(
        self, deps: SessionDeps, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.deps = deps
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        ssl_obj = writer.get_extra_info("ssl_object")
        self.client = ClientInfo(
            ip=ip,
            listener=deps.listener,
            tls=describe_tls(ssl_obj) if ssl_obj is not None else "",
            lmtp=deps.settings.lmtp,
            trusted=deps.relay.is_trusted(ip),
        )
        settings = replace(
            deps.settings, tls_active=ssl_obj is not None or deps.settings.tls_active
        )
        if deps.auth is None and settings.auth_mechanisms:
            settings = replace(settings, auth_mechanisms=())
        self.conn = ServerConnection(
            settings,
            mechanisms=deps.auth.mechanisms if deps.auth is not None else BUILTIN_MECHANISMS,
        )
        self.auth_user = ""  # the authenticated username, once AUTH succeeded
        self.account: Account | None = None
        self.tx: IntakeTransaction | None = None
        self.in_data = False
        self._stop_after_transaction = False
        self._idle_reader: asyncio.Task[bytes] | None = None
        self._auth_slot = False  # holds one slot of the AUTH failure budget

    def request_shutdown(self) -> None:
        """The server is stopping: an idle session gets 421 now; a session in
        a transaction may finish it (the listener bounds how long) and then
        gets 421 instead of its next reply."""
        self._stop_after_transaction = True
        if self.tx is None and self._idle_reader is not None:
            self._idle_reader.cancel()

    # -- I/O ------------------------------------------------------------------
    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def _read(self) -> bytes:
        limits = self.deps.limits
        if self.in_data or self.tx is not None:
            timeout = limits.data_timeout if self.in_data else limits.command_timeout
            async with asyncio.timeout(timeout):
                return await self.reader.read(READ_SIZE)
        # Between transactions a shutdown may cut the wait short (request_shutdown).
        self._idle_reader = asyncio.ensure_future(self.reader.read(READ_SIZE))
        try:
            async with asyncio.timeout(limits.command_timeout):
                return await self._idle_reader
        finally:
            self._idle_reader = None

    async def run(self, greeting: Reply | None = None) -> None:
        try:
            async with asyncio.timeout(self.deps.limits.session_timeout):
                await self._run(greeting)
        except TimeoutError:
            await self._say_and_close(TIMEOUT)
        except (ConnectionError, ssl.SSLError):
            pass  # the peer went away
        except OSError as exc:
            # Not the peer leaving (that is a ConnectionError): a local I/O error
            # (disk, spool, a file some step needed). Log it and say 421, never a
            # silent reset; the details stay in the log.
            logging.getLogger("postillon.inbound").warning(
                "session from %s ended by a local I/O error: %s", self.client.ip, exc
            )
            with contextlib.suppress(Exception):  # replies already due (pipelining) first
                self.writer.write(self.conn.data_to_send())
            await self._say_and_close(LOCAL_IO_ERROR)
        finally:
            self._abort_tx()
            self._release_auth_slot()
            self.writer.close()
            # A TLS close waits for the peer's close_notify; a peer that does
            # not answer must not hold the session (or a shutdown) open.
            try:
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                self.writer.transport.abort()
            except Exception:
                pass

    async def _say_and_close(self, reply: Reply) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(reply.to_bytes())
            await asyncio.wait_for(self.writer.drain(), 5)

    def _queue_down(self) -> bool:
        available = self.deps.queue_available
        return available is not None and not available()

    async def _run(self, greeting: Reply | None) -> None:
        conn = self.conn
        if self._queue_down():
            greeting = QUEUE_UNAVAILABLE
        conn.greet(
            greeting or Reply.of(220, None, f"{self.deps.settings.hostname} ESMTP postillon")
        )
        while not conn.closing:
            event = conn.next_event()
            if event is NEED_DATA:
                if self._stop_after_transaction and self.tx is None:
                    conn.shutdown(SHUTTING_DOWN)
                    break
                await self._flush()
                try:
                    data = await self._read()
                except asyncio.CancelledError:
                    if not self._stop_after_transaction:
                        raise
                    conn.shutdown(SHUTTING_DOWN)
                    break
                conn.receive_data(data)
                continue
            await self._handle(event)
        await self._flush()

    # -- events -------------------------------------------------------------
    async def _handle(self, event: object) -> None:
        conn = self.conn
        match event:
            case ev.BodyData(data=data):
                if self.tx is not None:
                    self.tx.write(data)
            case ev.Hello(verb=verb, name=name):
                self.client = replace(self.client, helo=name, esmtp=verb != "HELO")
                self._abort_tx()
                conn.accept_hello()
            case ev.MailFrom(sender=sender, params=params):
                self._abort_tx()
                if self._queue_down():
                    conn.shutdown(QUEUE_UNAVAILABLE)
                    return
                refusal = self._submission_sender_check(sender)
                if refusal is not None:
                    conn.reply(refusal)
                    return
                self.client = replace(self.client, smtputf8=params.smtputf8)
                self.tx = self.deps.intake.begin(
                    str(sender) if sender is not None else "",
                    params,
                    self.client,
                    self.deps.listener,
                )
                # RFC 6409 §8: submitted mail gets Date:/Message-ID: if missing.
                self.tx.add_missing_headers = self.account is not None
                conn.reply(Reply.of(250, "2.1.0", "Ok"))
            case ev.RcptTo(recipient=recipient, params=params):
                self._rcpt(recipient, params)
            case ev.DataRequested():
                if self.tx is None:
                    conn.reply(TEMP_LOCAL_ERROR)
                    return
                self.tx.start_body()
                self.in_data = True
                conn.reply(Reply.of(354, None, "End data with <CR><LF>.<CR><LF>"))
            case ev.MessageComplete():
                await self._complete(event)
            case ev.MessageAborted(reply=reply):
                self.in_data = False
                if self.tx is not None:
                    self._count_rejected("data")
                    self.deps.maillog.event(
                        "rejected",
                        self.tx.queue_id,
                        reason=str(reply),
                        client=self.client.describe(),
                    )
                self._abort_tx()
            case ev.TransactionReset() | ev.ConnectionClosed():
                self.in_data = False
                self._abort_tx()
            case ev.StartTlsRequested():
                await self._starttls()
            case ev.AuthPassword() | ev.AuthScramLookup() | ev.AuthProof():
                await self._auth(event)
            case ev.AuthAborted():  # a SCRAM exchange cancelled before its proof
                self._release_auth_slot()
            case ev.Authenticated(mechanism=mechanism, username=username):
                self.auth_user = username
                self.account = self.deps.auth.store.get(username) if self.deps.auth else None
                self.client = replace(
                    self.client,
                    authenticated=True,
                    hide_ip=self.deps.submission and self.deps.hide_client_ip,
                )
                self.deps.maillog.event(
                    "authenticated",
                    client=self.client.describe(),
                    username=_loggable_name(username),
                    mechanism=mechanism,
                )
            case ev.CommandRejected() | ev.QuitRequested() | ev.TooManyErrors():
                pass
            case _:
                pass

    def _rcpt(self, recipient: Address, params: RcptParams) -> None:
        conn = self.conn
        if self.tx is None:
            conn.reply(Reply.of(503, "5.5.1", "Need MAIL command"))
            return
        decision = self.deps.relay.check_recipient(
            recipient, self.client.ip, self.client.authenticated
        )
        if isinstance(decision, RecipientAccepted) and self._policed():
            limited = self._rate_limits().check_recipient(self._username(), self.client.ip)
            if limited is not None:
                self._count_rejected("rate_limit")
                self.deps.maillog.event(
                    "rejected", self.tx.queue_id, to=str(recipient), reason=limited.log_reason
                )
                conn.reply(limited.reply)
                return
        if isinstance(decision, RecipientAccepted):
            given = str(recipient)
            for target in decision.targets:
                self.tx.add_recipient(
                    NewRecipient(target, params, original=given if target != given else None)
                )
            conn.reply(Reply.of(250, "2.1.5", "Ok"))
            return
        self._count_rejected(reject_reason_for_recipient(decision.reply))
        self.deps.maillog.event(
            "rejected",
            self.tx.queue_id,
            **{"from": self.tx.sender, "to": str(recipient)},
            reason=str(decision.reply),
            client=self.client.describe(),
        )
        conn.reply(decision.reply)

    async def _complete(self, event: ev.MessageComplete) -> None:
        self.in_data = False
        tx, self.tx = self.tx, None
        # LMTP (RFC 2033 4.2): one reply per accepted recipient; SMTP: one reply.
        replies_needed = event.recipients or 1 if self.deps.settings.lmtp else 1
        if tx is None:
            for _ in range(max(1, replies_needed)):
                self.conn.reply(TEMP_LOCAL_ERROR)
            return
        if tx.failure is not None:
            # The spool failed mid-body (disk full: 452 4.3.1; intake logged it): no
            # checks on a truncated message, just the reply.
            tx.abort()
            self._count_rejected(reject_reason_for_commit(tx.failure))
            for _ in range(max(1, replies_needed)):
                self.conn.reply(tx.failure)
            return
        if self.account is not None:
            decision = check_from_header(
                self.account,
                from_header_values(tx.header_block),
                self.deps.sender_policy,
                self.deps.recipient_delimiter,
            )
            if decision.warning:
                self.deps.maillog.event("warning", tx.queue_id, reason=decision.warning)
            if not decision.allowed and decision.reply is not None:
                tx.abort()
                self._count_rejected("sender_policy")
                self.deps.maillog.event("rejected", tx.queue_id, reason=str(decision.reply))
                for _ in range(max(1, replies_needed)):
                    self.conn.reply(decision.reply)
                return
        refusal = await self._authenticate(tx)
        if refusal is not None:
            for _ in range(max(1, replies_needed)):
                self.conn.reply(refusal)
            return
        try:
            queue_id = await tx.commit()
            reply = Reply.of(250, "2.0.0", f"Ok: queued as {queue_id}")
        except IntakeError as exc:
            reply = exc.reply
            self._count_rejected(reject_reason_for_commit(reply))
            self.deps.maillog.event(
                "rejected", tx.queue_id, reason=str(reply), client=self.client.describe()
            )
        for _ in range(max(1, replies_needed)):
            self.conn.reply(reply)

    # -- inbound authentication (SPF, DKIM, DMARC, ARC) -----------------------
    async def _authenticate(self, tx: IntakeTransaction) -> Reply | None:
        """Run the checks before the commit; the refusal to send, or None.

        Authenticated (submission) clients and [relay] trusted_networks skip them;
        local mail never gets here.
        """
        checks = self.deps.authentication
        if checks is None:
            return None
        trusted = self.deps.relay.is_trusted(self.client.ip)
        if (
            self.client.authenticated
            or self.deps.submission
            or (trusted and not checks.config.check_trusted_networks)
        ):
            # Our own senders are not checked, but may not forge our verdicts either.
            header, removed = strip_own_results(tx.header_block, checks.authserv_id)
            if removed:
                tx.rewrite_header(b"", header)
            return None
        too_big = tx.size > checks.config.max_verify_size
        try:
            # The message is read into memory only once it has a slot.
            async with checks.verify_slot():
                facts = MessageFacts(
                    client_ip=self.client.ip,
                    helo=self.client.helo,
                    mail_from=tx.sender,
                    header=tx.header_block,
                    message=None if too_big else tx.message_bytes(),
                    recipients=[(r.address, r.original or r.address) for r in tx.recipients],
                )
                verdict = await checks.evaluate(facts)
        except VerifyBusy:
            tx.abort()
            self._count_rejected("local_error")
            self.deps.maillog.event("rejected", tx.queue_id, reason=str(VERIFY_BUSY))
            return VERIFY_BUSY
        except Exception:
            logging.getLogger("postillon.inbound").exception("authentication checks failed")
            tx.abort()
            self._count_rejected("local_error")
            return TEMP_LOCAL_ERROR
        log_fields = {"results": verdict.summary(), "action": verdict.decision.action}
        if verdict.decision.reason:
            log_fields["reason"] = verdict.decision.reason
        self.deps.maillog.event("authentication", tx.queue_id, **log_fields)
        if verdict.decision.reply is not None:
            tx.abort()
            self._count_rejected("authentication")
            self.deps.maillog.event(
                "rejected",
                tx.queue_id,
                reason=str(verdict.decision.reply),
                client=self.client.describe(),
            )
            return verdict.decision.reply
        tx.rewrite_header(verdict.prepend, verdict.header)
        return None

    # -- submission policy (RFC 6409) -----------------------------------------
    def _policed(self) -> bool:
        return self.deps.rate_limits is not None and (
            self.deps.submission or self.account is not None
        )

    def _rate_limits(self) -> SubmissionRateLimits:
        assert self.deps.rate_limits is not None
        return self.deps.rate_limits

    def _username(self) -> str | None:
        return self.account.username if self.account is not None else None

    def _submission_sender_check(self, sender: Address | None) -> Reply | None:
        """Sender ownership, then the message rate; the refusal to send or None."""
        if self.account is not None:
            decision = check_mail_from(
                self.account,
                str(sender) if sender is not None else "",
                self.deps.sender_policy,
                self.deps.recipient_delimiter,
            )
            if decision.warning:
                self.deps.maillog.event(
                    "warning", client=self.client.describe(), reason=decision.warning
                )
            if not decision.allowed:
                self._count_rejected("sender_policy")
                return decision.reply
        if self._policed():
            limited = self._rate_limits().check_message(self._username(), self.client.ip)
            if limited is not None:
                self._count_rejected("rate_limit")
                self.deps.maillog.event(
                    "rejected", client=self.client.describe(), reason=limited.log_reason
                )
                return limited.reply
        return None

    async def _starttls(self) -> None:
        ctx = self.deps.tls_context
        if ctx is None or self.conn.tls_active:
            self.conn.reply(Reply.of(454, "4.7.0", "TLS not available"))
            return
        self.conn.reply(Reply.of(220, "2.0.0", "Ready to start TLS"))
        await self._flush()
        # Anything the client sent after STARTTLS and before the handshake is
        # plaintext injection (CVE-2011-0411): the core dropped what it had,
        # and the stream reader's own buffer must be dropped too.
        buffered = getattr(self.reader, "_buffer", None)
        if isinstance(buffered, bytearray):
            buffered.clear()
        async with asyncio.timeout(self.deps.limits.command_timeout):
            await self.writer.start_tls(ctx)
        ssl_obj = self.writer.get_extra_info("ssl_object")
        self.client = replace(self.client, tls=describe_tls(ssl_obj))
        if self.deps.metrics is not None and ssl_obj is not None:
            self.deps.metrics.tls(ssl_obj.version() or "")
        self.conn.tls_established()

    # -- AUTH (RFC 4954) ------------------------------------------------------
    async def _auth(self, event: ev.AuthPassword | ev.AuthScramLookup | ev.AuthProof) -> None:
        auth = self.deps.auth
        conn = self.conn
        if auth is None:  # cannot happen: no mechanisms are offered without it
            conn.reply(R.AUTH_UNAVAILABLE)
            return
        ip = self.client.ip
        # One attempt = one slot of the failure budget, taken before anything is
        # checked (inbound/auth.py); SCRAM takes it at the lookup, settles it at the proof.
        if not (isinstance(event, ev.AuthProof) and self._auth_slot):
            self._release_auth_slot()
            refused = auth.guard.begin(ip)
            if refused is not None:
                if self.deps.metrics is not None:
                    self.deps.metrics.auth_failed(event.mechanism)
                self.deps.maillog.event(
                    "auth_failed",
                    client=self.client.describe(),
                    username=_loggable_name(event.username),
                    mechanism=event.mechanism,
                    reason="blocked after too many failures"
                    if refused == "blocked"
                    else "too many attempts in progress",
                )
                conn.reply(R.AUTH_TOO_MANY_FAILURES if refused == "blocked" else R.AUTH_UNAVAILABLE)
                return
            self._auth_slot = True
        # Acting as someone else (a different authzid) is not supported.
        own = event.authzid in ("", event.username)
        try:
            if isinstance(event, ev.AuthScramLookup):
                creds: ScramCredentials | None = None
                if own:
                    creds = await asyncio.to_thread(auth.store.scram_credentials, event.username)
                conn.auth_credentials(creds)
                return
            if isinstance(event, ev.AuthProof):
                ok = event.valid and own
            else:
                ok = own and (
                    await asyncio.to_thread(
                        auth.store.verify_password, event.username, event.password
                    )
                    is not None
                )
        except Exception:
            self._release_auth_slot()
            logging.getLogger("postillon.inbound").exception("credential store failed")
            conn.reply(R.AUTH_UNAVAILABLE)
            return
        self._release_auth_slot()
        if ok:
            conn.auth_accept()
            return
        penalty = auth.guard.failure(ip)
        if self.deps.metrics is not None:
            self.deps.metrics.auth_failed(event.mechanism)
        self.deps.maillog.event(
            "auth_failed",
            client=self.client.describe(),
            username=_loggable_name(event.username),
            mechanism=event.mechanism,
            failures=penalty.failures,
        )
        if penalty.delay > 0:
            await auth.guard.sleep(penalty.delay)
        conn.reply(R.AUTH_TOO_MANY_FAILURES if penalty.disconnect else R.AUTH_FAILED)

    def _release_auth_slot(self) -> None:
        if self._auth_slot and self.deps.auth is not None:
            self.deps.auth.guard.release(self.client.ip)
        self._auth_slot = False

    def _count_rejected(self, reason: str) -> None:
        if self.deps.metrics is not None:
            self.deps.metrics.rejected(reason)

    def _abort_tx(self) -> None:
        if self.tx is not None:
            self.tx.abort()
            self.tx = None
