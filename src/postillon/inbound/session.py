"""The session driver: a thin asyncio adapter around ``ServerConnection``.

It moves bytes between the socket and the sans-IO core, applies timeouts, and
turns the core's decision events into questions to the policy pipeline
(``checks.pipeline``: every decision comes from there) and calls on intake.
Connection state (peer, TLS, HELO name) lives here; transaction state lives in
the ``IntakeTransaction`` (OpenSMTPD's smtp_session vs smtp_tx).

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

from postillon.checks.context import (
    ListenerKind,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.pipeline import Pipeline, Verdict
from postillon.config.model import LimitsConfig
from postillon.core.account import Account, ScramCredentials
from postillon.core.address import Address
from postillon.core.envelope import MailParams, NewRecipient, RcptParams
from postillon.core.reply import SHUTTING_DOWN, TEMP_LOCAL_ERROR, TIMEOUT, Reply
from postillon.inbound.auth import Authenticator, loggable_name
from postillon.inbound.policy import (
    SpoolView,
    apply_verdict,
    client_facts,
    greet_pause,
    new_session_id,
)
from postillon.inbound.tls import describe as describe_tls
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake, IntakeError, IntakeTransaction
from postillon.observability.maillog import MailLog
from postillon.observability.metrics import ListenerMetrics, reject_reason_for_commit
from postillon.osutil.streams import ReadDeadline, write_out
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


class ShutdownRequested(Exception):
    """Set on an idle session's reader by request_shutdown: its wait ends, it says 421."""


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """What every session of one listener shares."""

    settings: ServerSettings
    intake: Intake
    # Every decision about the session and its messages (checks/pipeline.py).
    pipeline: Pipeline
    maillog: MailLog
    limits: LimitsConfig
    listener: str
    kind: ListenerKind = "smtp"
    tls_context: ssl.SSLContext | None = None
    # SMTP AUTH (RFC 4954): None = no AUTH offered on this listener, whatever
    # settings.auth_mechanisms says.
    auth: Authenticator | None = None
    # Submission (RFC 6409): the client's IP may be kept out of headers.
    submission: bool = False
    hide_client_ip: bool = True
    # Whether an IP is in [relay] trusted_networks (a fact the checks are given).
    trusted: Callable[[str], bool] | None = None
    # False while a shared queue's database is unreachable: then the session
    # answers 421 4.3.0 (greeting, MAIL) instead of a 250 it could not keep.
    queue_available: Callable[[], bool] | None = None
    metrics: ListenerMetrics | None = None
    # Seconds to wait, reading, before the greeting (the pregreet test; port 25).
    greet_pause: float = 0.0


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
            trusted=deps.trusted(ip) if deps.trusted is not None else False,
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
        self.ctx = SessionContext(
            new_session_id(),
            client_facts(
                self.client,
                deps.kind,
                deps.settings.hostname,
                port=peer[1] if isinstance(peer, tuple) else 0,
                trusted=deps.trusted(ip) if deps.trusted is not None and ip else False,
            ),
        )
        sock = writer.get_extra_info("sockname")
        if isinstance(sock, tuple):  # our address: a HELO claiming it is a lie
            self.ctx.client = replace(self.ctx.client, local_ips=(str(sock[0]),))
        self.ptx: TransactionContext | None = None  # the pipeline's view of self.tx
        self.in_data = False
        self._stop_after_transaction = False
        self._reads = ReadDeadline(reader, READ_SIZE)  # one timer, not one per read
        self._auth_slot = False  # holds one slot of the AUTH failure budget

    def request_shutdown(self) -> None:
        """The server is stopping: an idle session gets 421 now; a session in
        a transaction may finish it (the listener bounds how long) and then
        gets 421 instead of its next reply."""
        self._stop_after_transaction = True
        idle = self.tx is None and not self.in_data and self._reads.reading
        if idle:  # waiting for a command between transactions: the read raises it
            self.reader.set_exception(ShutdownRequested())

    # -- I/O ------------------------------------------------------------------
    async def _flush(self) -> None:
        if out := self.conn.data_to_send():
            await write_out(self.writer, out)

    async def _read(self) -> bytes:
        limits = self.deps.limits
        # Between transactions a shutdown may cut the wait short (request_shutdown).
        return await self._reads.read(
            limits.data_timeout if self.in_data else limits.command_timeout
        )

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
            self._reads.close()
            await self._abort_tx()
            self._release_auth_slot()
            with contextlib.suppress(Exception):
                await self.deps.pipeline.close(self.ctx)
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

    def _facts(self) -> None:
        """Tell the checks what the session learnt (HELO, TLS, AUTH)."""
        self.ctx.client = client_facts(
            self.client,
            self.deps.kind,
            self.deps.settings.hostname,
            trusted=self.ctx.client.trusted,
            username=self.auth_user,
            known=self.ctx.client,
        )

    def _refused(self, verdict: Verdict, queue_id: str = "", **fields: str) -> None:
        """Count and log a refusal a check decided."""
        assert verdict.reply is not None
        self._count_rejected(verdict.metric or "policy")
        self.deps.maillog.event(
            "rejected",
            queue_id,
            **fields,
            reason=verdict.reason or str(verdict.reply),
            check=verdict.check,
            client=self.client.describe(),
            session=self.ctx.session_id,  # for `postillon explain SESSION`
        )

    async def _connect(self) -> Reply | None:
        """The connect phase; the refusal to say instead of the greeting, or None."""
        pipeline = self.deps.pipeline
        facts = self.ctx.client
        pipeline.note(self.ctx, "connect", "session", "connect", f"{facts.ip} port {facts.port}")
        if not pipeline.wants("connect"):
            return None
        verdict = await pipeline.connect(self.ctx)
        # A check may have learnt the client's forward-confirmed name (Received:).
        self.client = replace(self.client, rdns=self.ctx.client.rdns)
        if verdict.reply is None:
            return None
        self._refused(verdict)
        return verdict.reply

    async def _run(self, greeting: Reply | None) -> None:
        conn = self.conn
        early = await greet_pause(self.reader, self.deps.greet_pause)
        if early:
            self.ctx.client = replace(self.ctx.client, pregreet=early)
        refusal = await self._connect()
        if refusal is not None:
            conn.greet(refusal if refusal.code != 220 else TEMP_LOCAL_ERROR)
            await self._flush()
            return
        if self._queue_down():
            greeting = QUEUE_UNAVAILABLE
        conn.greet(
            greeting or Reply.of(220, None, f"{self.deps.settings.hostname} ESMTP postillon")
        )
        if early:  # a pregreet the checks let pass (a trusted network): keep its commands
            conn.receive_data(early)
        while not conn.closing:
            event = conn.next_event()
            if event is NEED_DATA:
                if self._stop_after_transaction and self.tx is None:
                    conn.shutdown(SHUTTING_DOWN)
                    break
                await self._flush()
                try:
                    data = await self._read()
                except (asyncio.CancelledError, ShutdownRequested):
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
                await self._abort_tx()
                await self._hello(verb, name)
            case ev.MailFrom(sender=sender, params=params):
                await self._abort_tx()
                if self._queue_down():
                    conn.shutdown(QUEUE_UNAVAILABLE)
                    return
                await self._mail(sender, params)
            case ev.RcptTo(recipient=recipient, params=params):
                await self._rcpt(recipient, params)
            case ev.DataRequested():
                await self._data()
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
                await self._abort_tx()
            case ev.TransactionReset() | ev.ConnectionClosed():
                self.in_data = False
                await self._abort_tx()
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
                self._facts()
                self.deps.maillog.event(
                    "authenticated",
                    client=self.client.describe(),
                    username=loggable_name(username),
                    mechanism=mechanism,
                )
            case ev.CommandRejected() | ev.QuitRequested() | ev.TooManyErrors():
                pass
            case _:
                pass

    # -- the phases: ask the pipeline, act on its verdict ------------------------
    def _say(self, verdict: Verdict) -> None:
        assert verdict.reply is not None
        if verdict.disconnect:
            self.conn.shutdown(verdict.reply)
        else:
            self.conn.reply(verdict.reply)

    async def _hello(self, verb: str, name: str) -> None:
        self._facts()
        pipeline = self.deps.pipeline
        pipeline.note(self.ctx, "helo", "session", "command", f"{verb} {name}")
        if pipeline.wants("helo"):
            verdict = await pipeline.helo(self.ctx)
            if verdict.reply is not None:
                self._refused(verdict, helo=name)
                self._say(verdict)
                return
        self.conn.accept_hello()

    async def _mail(self, sender: Address | None, params: MailParams) -> None:
        pipeline = self.deps.pipeline
        self.client = replace(self.client, smtputf8=params.smtputf8)
        address = str(sender) if sender is not None else ""
        tx = self.deps.intake.begin(address, params, self.client, self.deps.listener)
        ptx = TransactionContext(address, params, tx.queue_id)
        pipeline.note(
            self.ctx, "mail", "session", "command", f"MAIL FROM:<{address}>", None, tx.queue_id
        )
        verdict = await pipeline.mail(self.ctx, ptx)
        if verdict.reply is not None:
            tx.abort()
            await pipeline.reset(self.ctx, ptx)
            # No queue id: nothing of this transaction will ever be a message.
            self._refused(verdict, **{"from": address})
            self._say(verdict)
            return
        self.tx, self.ptx = tx, ptx
        # RFC 6409 §8: submitted mail gets Date:/Message-ID: if missing.
        tx.add_missing_headers = self.account is not None
        self.conn.reply(Reply.of(250, "2.1.0", "Ok"))

    async def _rcpt(self, recipient: Address, params: RcptParams) -> None:
        tx, ptx = self.tx, self.ptx
        if tx is None or ptx is None:
            self.conn.reply(Reply.of(503, "5.5.1", "Need MAIL command"))
            return
        given = str(recipient)
        pipeline = self.deps.pipeline
        pipeline.note(
            self.ctx, "rcpt", "session", "command", f"RCPT TO:<{given}>", None, tx.queue_id
        )
        verdict = await pipeline.rcpt(self.ctx, ptx, RecipientFacts(given, params, recipient))
        if verdict.reply is not None:
            self._refused(verdict, tx.queue_id, **{"from": tx.sender, "to": given})
            self._say(verdict)
            return
        for target in verdict.targets:
            tx.add_recipient(
                NewRecipient(target, params, original=given if target != given else None)
            )
        ptx.recipients.append(RecipientFacts(given, params, recipient, verdict.targets))
        self.conn.reply(Reply.of(250, "2.1.5", "Ok"))

    async def _data(self) -> None:
        tx, ptx = self.tx, self.ptx
        if tx is None or ptx is None:
            self.conn.reply(TEMP_LOCAL_ERROR)
            return
        pipeline = self.deps.pipeline
        if pipeline.wants("data"):
            verdict = await pipeline.data(self.ctx, ptx)
            if verdict.reply is not None:
                self._refused(verdict, tx.queue_id)
                self._say(verdict)
                return
        tx.start_body()
        self.in_data = True
        self.conn.reply(Reply.of(354, None, "End data with <CR><LF>.<CR><LF>"))

    async def _complete(self, event: ev.MessageComplete) -> None:
        self.in_data = False
        tx, self.tx = self.tx, None
        ptx, self.ptx = self.ptx, None
        # LMTP (RFC 2033 4.2): one reply per accepted recipient; SMTP: one reply.
        replies_needed = max(1, event.recipients or 1 if self.deps.settings.lmtp else 1)
        if tx is None or ptx is None:
            reply = TEMP_LOCAL_ERROR
        elif tx.failure is not None:
            # The spool failed mid-body (disk full: 452 4.3.1; intake logged it): no
            # checks on a truncated message, just the reply.
            tx.abort()
            await self.deps.pipeline.reset(self.ctx, ptx)
            self._count_rejected(reject_reason_for_commit(tx.failure))
            reply = tx.failure
        else:
            reply = await self._check_and_commit(tx, ptx)
        for _ in range(replies_needed):
            self.conn.reply(reply)

    async def _check_and_commit(self, tx: IntakeTransaction, ptx: TransactionContext) -> Reply:
        """End of data: the checks' verdict, then the commit; the reply to send."""
        pipeline = self.deps.pipeline
        hold = ""
        if pipeline.wants("end_of_data") or ptx.discarded or ptx.quarantined:
            verdict = await pipeline.end_of_data(self.ctx, ptx, SpoolView(tx))
            if verdict.reply is not None:
                tx.abort()
                refusal = Verdict(
                    verdict.reply, check=verdict.check, reason=verdict.reason, metric=verdict.metric
                )
                self._refused(refusal, tx.queue_id)
                pipeline.note(
                    self.ctx, "end_of_data", "session", "reject", "", verdict.reply, tx.queue_id
                )
                return verdict.reply
            if verdict.discard:
                tx.abort()
                self.deps.maillog.event("discarded", tx.queue_id, reason=verdict.discard)
                # The client is told what it would be told for a queued message.
                reply = Reply.of(250, "2.0.0", f"Ok: queued as {tx.queue_id}")
                pipeline.note(
                    self.ctx, "end_of_data", "session", "discard", verdict.discard, reply,
                    tx.queue_id,
                )  # fmt: skip
                return reply
            apply_verdict(tx, verdict)
            hold = verdict.quarantine
        try:
            queue_id = await tx.commit(hold=hold)
            reply = Reply.of(250, "2.0.0", f"Ok: queued as {queue_id}")
            action, saw = ("quarantine", hold) if hold else ("queued", "")
        except IntakeError as exc:
            reply = exc.reply
            action, saw = "reject", "the queue did not take the message"
            self._count_rejected(reject_reason_for_commit(reply))
            self.deps.maillog.event(
                "rejected", tx.queue_id, reason=str(reply), client=self.client.describe()
            )
        pipeline.note(self.ctx, "end_of_data", "session", action, saw, reply, tx.queue_id)
        return reply

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
        self._facts()
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
                    username=loggable_name(event.username),
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
            username=loggable_name(event.username),
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

    async def _abort_tx(self) -> None:
        if self.tx is not None:
            self.tx.abort()
            self.tx = None
        ptx, self.ptx = self.ptx, None
        if ptx is not None:
            await self.deps.pipeline.reset(self.ctx, ptx)
