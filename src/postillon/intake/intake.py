"""The intake transaction: begin → add recipients → stream body → commit/abort."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import IO

from prometheus_client import Counter

from postillon.core.clock import Clock, SystemClock
from postillon.core.envelope import MailParams
from postillon.core.priority import message_priority
from postillon.core.queueid import new_queue_id
from postillon.core.reply import Reply
from postillon.helpers.pool import HelperPool
from postillon.intake.dkim_sign import PrefixedBody, signature_fields, start_signing
from postillon.intake.headers import ClientInfo, received_header
from postillon.intake.recent import MAX_CACHED_BODY, RecentMessages
from postillon.intake.storage_errors import reply_for_storage_error
from postillon.observability.maillog import MailLog, null_maillog
from postillon.observability.metrics import Metrics
from postillon.queue.store import MessageInfo, NewMessage, NewRecipient, QueueStore
from postillon.signing.signer import DkimSigner, MessageSigning

# Bodies up to this size stay in memory; larger ones spill to a file in the
# spool directory. 4 KiB mail (the common case) never touches the filesystem
# before the store's single shared commit.
SPOOL_MEMORY_LIMIT = 256 * 1024
# Headers are scanned for loop detection up to this many bytes; a header
# section larger than this is unusual and is not scanned further.
HEADER_SCAN_LIMIT = 256 * 1024
# Postfix's hopcount_limit: more Received: headers than this means a mail loop.
MAX_HOPS = 50

_RECEIVED = re.compile(rb"(?:^|\r\n)received:", re.IGNORECASE)
_FIELD_NAME = re.compile(rb"(?:^|\r\n)([!-9;-~]+)[ \t]*:")
# RFC 8689 §3: "TLS-Required: No" (the one value defined; case-insensitive) asks
# that the message go out even where the destination's TLS policy would stop it.
_TLS_REQUIRED_NO = re.compile(rb"(?:^|\r\n)tls-required[ \t]*:[ \t]*no[ \t]*(?:\r\n|$)", re.I)

_Callback = Callable[[], None]

TOO_MANY_HOPS = Reply.of(554, "5.4.6", "Too many hops: mail loop detected (RFC 5321 6.3)")


def _by_domain(recipients: list[NewRecipient]) -> tuple[NewRecipient, ...]:
    """The recipients with each domain's together (otherwise in RCPT order): the store
    numbers records in this order and the runner claims in that order, so one claim
    brings a domain's recipients as one delivery (one SMTP transaction), not one each."""
    if len(recipients) < 2:
        return tuple(recipients)
    return tuple(sorted(recipients, key=lambda r: r.address.rpartition("@")[2].lower()))


class IntakeError(Exception):
    """The message cannot be taken; ``reply`` says what to tell the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class IntakeTransaction:
    """One message on its way into the queue. Not reusable."""

    def __init__(
        self,
        intake: Intake,
        sender: str,
        params: MailParams,
        client: ClientInfo,
        source: str,
    ) -> None:
        self._intake = intake
        self.queue_id = new_queue_id(intake.clock.now())
        self.sender = sender
        self.params = params
        self.client = client
        self.source = source
        self.recipients: list[NewRecipient] = []
        self._body: IO[bytes] | None = None
        self._size = 0
        self._header_buf = b""
        self._header_done = False
        self._hops = 0
        self._signing: MessageSigning | None = None  # DKIM, for local/authenticated senders
        self._trace_len = 0  # bytes of our Received: at the start of the spool
        self.closed = False
        # Set when the spool could not take the body (disk full, I/O error): the rest
        # of the body is discarded and commit() refuses with this reply. The client
        # is still sending; raising out of write() would only reset its connection.
        self.failure: Reply | None = None
        # Submission (RFC 6409 §8): add Date: and Message-ID: when missing.
        self.add_missing_headers = False

    # -- envelope ---------------------------------------------------------
    def add_recipient(self, recipient: NewRecipient) -> None:
        self.recipients.append(recipient)

    # -- body ---------------------------------------------------------------
    def start_body(self, trace: bool = True) -> None:
        """Open the spool and write our Received: header first (its timestamp
        is the start of DATA, which is when the transfer began)."""
        if self._body is not None or self.failure is not None:
            raise RuntimeError("body already started")
        self._body = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in commit/abort
            max_size=SPOOL_MEMORY_LIMIT, dir=str(self._intake.spool_dir)
        )
        if trace:
            only = self.recipients[0].original or self.recipients[0].address
            header = received_header(
                self.client,
                self._intake.hostname,
                self.queue_id,
                only if len(self.recipients) == 1 else None,
                self._intake.clock.now(),
            )
            self._body.write(header)
            self._size += len(header)
            self._trace_len = len(header)

    def write(self, data: bytes) -> None:
        """Add body bytes. Never raises for the spool's I/O errors: see ``failure``."""
        if self.failure is not None:
            return
        try:
            self._write(data)
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        self.failure = reply_for_storage_error(exc)
        self._intake.maillog.event(
            "error",
            self.queue_id,
            reason=f"spool write failed: {exc.strerror or exc}",
            reply=str(self.failure),
        )
        # Give the space back now: the client may send the next message at once.
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(OSError):
                body.close()

    def _write(self, data: bytes) -> None:
        if self._body is None:
            self.start_body()
        assert self._body is not None
        if self._header_done:
            self._body.write(data)
            self._size += len(data)
            if self._signing is not None:
                self._signing.update(data)
            return
        # The header section is held back (it is small, and bounded) until it
        # ends, so that loop detection and submission fix-ups see all of it
        # before anything after it is written.
        buf = self._header_buf + data
        if buf.startswith(b"\r\n"):
            self._finish_headers(b"", buf)
            return
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            self._finish_headers(buf[: end + 2], buf[end + 2 :])
        elif len(buf) > HEADER_SCAN_LIMIT:
            self._finish_headers(buf, b"")
        else:
            self._header_buf = buf

    def _finish_headers(self, header: bytes, rest: bytes, complete: bool = False) -> None:
        """Write the client's header section, any added fields, and what follows."""
        assert self._body is not None
        self._header_done = True
        self._header_buf = header
        self._hops = len(_RECEIVED.findall(header))
        added = self._missing_headers(header) if self.add_missing_headers else b""
        for piece in (header, added, rest):
            self._body.write(piece)
            self._size += len(piece)
        # Sign only a header section seen whole: it ended with an empty line, or the
        # message ended inside it (complete=True from commit).
        if rest.startswith(b"\r\n") or complete:
            self._signing = start_signing(
                self._intake.signer,
                header + added,
                self.sender,
                self.client.ip,
                self.client.authenticated,
            )
            if self._signing is not None:
                self._signing.update(rest[2:])

    def _missing_headers(self, header: bytes) -> bytes:
        """RFC 6409 §8.1-8.3: a submission server may add Date: and Message-ID:."""
        present = {m.group(1).lower() for m in _FIELD_NAME.finditer(header)}
        added = []
        if b"date" not in present:
            added.append(f"Date: {formatdate(self._intake.clock.now(), localtime=True)}\r\n")
        if b"message-id" not in present:
            domain = self._intake.hostname
            added.append(f"Message-ID: <{self.queue_id}.{secrets.token_hex(6)}@{domain}>\r\n")
        return "".join(added).encode("ascii")

    @property
    def size(self) -> int:
        return self._size

    @property
    def header_block(self) -> bytes:
        """The client's header section (as far as scanned), for checks."""
        return self._header_buf

    # -- end-of-data checks (inbound authentication) ---------------------------
    def message_bytes(self) -> bytes:
        """The message as the client sent it (without our Received:), for checks
        that need the body (DKIM, ARC). Call only once the body is complete."""
        if self._body is None:
            return b""
        try:
            if not self._header_done:  # the message ended inside its header section
                self._finish_headers(self._header_buf, b"", complete=True)
            self._body.seek(self._trace_len)
            data = self._body.read()
            self._body.seek(0, 2)
        except OSError as exc:
            self._spool_failed(exc)  # commit() refuses; the checks see nothing
            return b""
        return data

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body after the client's header section and its empty line (with any
        Date:/Message-ID: submission added in front of that line), from the spool."""
        body = self._body
        if body is None:
            return
        if not self._header_done:
            self._finish_headers(self._header_buf, b"", complete=True)
        body.seek(self._trace_len + len(self._header_buf))
        first = True
        try:
            while chunk := body.read(size):
                if first and chunk.startswith(b"\r\n"):
                    chunk = chunk[2:]
                first = False
                yield chunk
        finally:
            body.seek(0, 2)

    def replace_body(self, new_body: bytes) -> None:
        """Keep everything up to the client's header section, replace what follows
        with an empty line and ``new_body`` (a milter's SMFIR_REPLBODY)."""
        old = self._body
        if old is None:
            return
        try:
            if not self._header_done:
                self._finish_headers(self._header_buf, b"", complete=True)
            new = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in commit/abort
                max_size=SPOOL_MEMORY_LIMIT, dir=str(self._intake.spool_dir)
            )
            old.seek(0)
            new.write(old.read(self._trace_len + len(self._header_buf)))
            new.write(b"\r\n" + new_body)
            old.close()
            self._body = new
            self._size = new.tell()
        except OSError as exc:
            self._spool_failed(exc)
            return
        if self._signing is not None:  # sign what is stored, not what the client sent
            self._signing = start_signing(
                self._intake.signer,
                self._header_buf,
                self.sender,
                self.client.ip,
                self.client.authenticated,
            )
            if self._signing is not None:
                self._signing.update(new_body)

    def rewrite_header(self, prepend: bytes, header: bytes) -> None:
        """Put ``prepend`` on top and replace the client's header section with
        ``header`` (checks add Authentication-Results: and drop forged ones)."""
        old = self._body
        if old is None or (not prepend and header == self._header_buf):
            return
        try:
            self._rewrite_header(old, prepend, header)
        except OSError as exc:
            self._spool_failed(exc)

    def _rewrite_header(self, old: IO[bytes], prepend: bytes, header: bytes) -> None:
        if not self._header_done:  # the message ended inside its header section
            self._finish_headers(self._header_buf, b"", complete=True)
        new = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in commit/abort
            max_size=SPOOL_MEMORY_LIMIT, dir=str(self._intake.spool_dir)
        )
        old.seek(0)
        trace = old.read(self._trace_len)
        old.seek(self._trace_len + len(self._header_buf))
        new.write(prepend)
        new.write(trace)
        new.write(header)
        shutil.copyfileobj(old, new)
        old.close()
        self._body = new
        self._size = new.tell()
        self._trace_len += len(prepend)
        self._header_buf = header

    # -- outcome ------------------------------------------------------------
    async def commit(self, hold: str = "") -> str:
        """Make the message durable; return its queue id. Raises IntakeError.
        ``hold``: a quarantine reason; the message is committed held (``queue release``
        lets it go)."""
        if self.closed:
            raise RuntimeError("transaction already closed")
        if not self.recipients:
            self.abort()
            raise IntakeError(Reply.of(554, "5.5.1", "No valid recipients"))
        if self._body is not None and not self._header_done and self.failure is None:
            # The message ended inside its header section (no empty line).
            try:
                self._finish_headers(self._header_buf, b"", complete=True)
            except OSError as exc:
                self._spool_failed(exc)
        if self.failure is not None:  # logged when it happened
            self.abort()
            raise IntakeError(self.failure)
        if self._hops > self._intake.max_hops:
            self.abort()
            raise IntakeError(TOO_MANY_HOPS)
        if self._body is None:
            self.start_body()
        assert self._body is not None
        try:
            self._body.seek(0)
        except OSError as exc:
            self._spool_failed(exc)
            self.abort()
            raise IntakeError(self.failure or reply_for_storage_error(exc)) from exc
        body: IO[bytes] = self._body
        signed_by = None
        if self._signing is not None:
            # On top of everything, so the store keeps (and retries send) the signed bytes.
            fields = await signature_fields(
                self._signing, self._intake.clock.now(), self._intake.helpers
            )
            body = PrefixedBody(fields, self._body).as_file()
            self._size += len(fields)
            signed_by = self._signing.describe() if fields else None
            if fields and self._intake.metrics is not None:
                for key in self._signing.keys:
                    self._intake.metrics.dkim_signatures.labels(key.algorithm).inc()
        params = self.params
        # RFC 8689 §4.1: with REQUIRETLS on MAIL the header is ignored.
        if not params.requiretls and _TLS_REQUIRED_NO.search(self._header_buf):
            params = dataclasses.replace(params, tls_required_no=True)
        message = NewMessage(
            queue_id=self.queue_id,
            sender=self.sender,
            mail_params=params,
            recipients=_by_domain(self.recipients),
            body=body,
            size=self._size,
            received_at=self._intake.clock.now(),
            client=self.client.describe(),
            source=self.source,
            held=bool(hold),
            priority=message_priority(
                params.mt_priority,
                source=self.source,
                authenticated=self.client.authenticated,
                trusted=self.client.trusted,
            ),
        )
        try:
            await self._intake.store.commit(message)
            if self._size <= MAX_CACHED_BODY:
                body.seek(0)
                self._intake.recent.put(MessageInfo.envelope_of(message), body.read())
            else:
                self._intake.recent.put(MessageInfo.envelope_of(message), None)
        except Exception as exc:
            # A full disk is 452 4.3.1 (try later, nothing wrong with the message).
            reply = reply_for_storage_error(exc)
            self._intake.maillog.event(
                "error", self.queue_id, reason=f"queue commit failed: {exc!r}", reply=str(reply)
            )
            raise IntakeError(reply) from exc
        finally:
            self._close_body()
        self._intake.maillog.event(
            "received",
            self.queue_id,
            **{
                "from": self.sender,
                "size": self._size,
                "nrcpt": len(self.recipients),
                "client": self.client.describe() if not self.client.hide_ip else self.client.helo,
                "proto": self.client.protocol,
                "source": self.source,
                "dkim": signed_by,
            },
        )
        self._intake.count_received(self.source)
        if hold:
            self._intake.maillog.event("quarantined", self.queue_id, reason=hold)
        self._intake.notify_committed()
        return self.queue_id

    def abort(self) -> None:
        self._close_body()

    def _close_body(self) -> None:
        self.closed = True
        if self._body is not None:
            self._body.close()
            self._body = None


class Intake:
    """Factory for transactions; holds what every transaction shares."""

    def __init__(
        self,
        store: QueueStore,
        hostname: str,
        spool_dir: Path,
        *,
        clock: Clock | None = None,
        maillog: MailLog | None = None,
        max_hops: int = MAX_HOPS,
        signer: DkimSigner | None = None,
        helpers: HelperPool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        # Processes that make RSA signatures (postillon.helpers), or None: sign here.
        self.helpers = helpers
        self.max_hops = max_hops
        self.hostname = hostname
        self.spool_dir = spool_dir
        self.clock: Clock = clock or SystemClock()
        self.maillog = maillog or null_maillog()
        self._listeners: list[_Callback] = []
        self.recent = RecentMessages()
        self.metrics = metrics
        # Counter children per source (listener name, "sendmail", "bounce"):
        # resolved once, then only inc() on the accept path.
        self._received: dict[str, Counter] = {}
        spool_dir.mkdir(parents=True, exist_ok=True)

    def reconfigure(
        self,
        hostname: str,
        max_hops: int,
        signer: DkimSigner | None,
        helpers: HelperPool | None,
    ) -> None:
        """New settings from a reload; transactions already open keep what they
        read at their start (hostname in Received:), later ones get these."""
        self.hostname = hostname
        self.max_hops = max_hops
        self.signer = signer
        self.helpers = helpers

    def count_received(self, source: str) -> None:
        if self.metrics is None:
            return
        child = self._received.get(source)
        if child is None:
            child = self._received[source] = self.metrics.received.labels(source)
        child.inc()

    def begin(
        self, sender: str, params: MailParams, client: ClientInfo, source: str = "smtp"
    ) -> IntakeTransaction:
        return IntakeTransaction(self, sender, params, client, source)

    def on_commit(self, callback: _Callback) -> None:
        """Register a wake-up (the runner's), called after every commit."""
        self._listeners.append(callback)

    def notify_committed(self) -> None:
        for callback in self._listeners:
            callback()

    async def submit(
        self,
        sender: str,
        recipients: Sequence[NewRecipient],
        body: bytes,
        params: MailParams | None = None,
        client: ClientInfo | None = None,
        source: str = "local",
        trace: bool = True,
    ) -> str:
        """Queue a message that is already complete in memory (bounces, tests)."""
        tx = self.begin(sender, params or MailParams(), client or ClientInfo(), source)
        for rcpt in recipients:
            tx.add_recipient(rcpt)
        tx.start_body(trace=trace)
        tx.write(body)
        return await tx.commit()
