"""Build RFC 3464 delivery status notifications (bounces and delay warnings)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate

from postillon.core.envelope import BodyType, DsnRet, MailParams, RcptParams, xtext_encode
from postillon.core.reply import Reply

# Returning the whole message is the default only up to this size; larger
# messages return their headers (RFC 3461 §4.3 leaves the default to us).
FULL_RETURN_LIMIT = 256 * 1024
# Even with RET=FULL, a notification never carries more than this (the
# sender's mailbox may refuse a huge bounce; the headers identify the message).
FULL_RETURN_HARD_LIMIT = 10 * 1024 * 1024
HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    recipient: str
    original: str | None
    params: RcptParams
    reply: Reply
    remote: str = ""  # remote MTA that gave the reply, if any
    action: str = "failed"  # failed | delayed | delivered | relayed


def wants_notice(params: RcptParams, action: str) -> bool:
    """RFC 3461 §4.1: NOTIFY absent means failures (and, by choice, delays)."""
    if params.notify_never:
        return False
    if not params.notify:
        return action in ("failed", "delayed")
    wanted = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}
    return wanted[action] in params.notify


def returns_full_message(params: MailParams, size: int, action: str) -> bool:
    """RET=FULL returns the message, RET=HDRS the headers; unspecified: small
    messages whole (RFC 3461 4.3 leaves it to us); delay notices never."""
    if params.requiretls:
        # RFC 8689 §5: a REQUIRETLS message is bounced as if RET=HDRS was given
        # (RET=FULL disregarded): the body never travels in the notice.
        return False
    if action == "delayed":
        return False
    if params.ret is DsnRet.FULL:
        return size <= FULL_RETURN_HARD_LIMIT
    return params.ret is None and size <= FULL_RETURN_LIMIT


def _status(reply: Reply) -> str:
    if reply.status:
        return reply.status
    return f"{str(reply.code)[0]}.0.0"


def _text(value: str) -> str:
    """A remote server's words as header or report text: no control character
    (a terminal escape, a stray CR) gets through; CR and LF cannot be in a
    ``Reply`` line to begin with."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in value)


def _orcpt(orcpt: str) -> str:
    """RFC 3464 §2.3.1: ``addr-type;xtext`` as the ORCPT parameter carried it
    (the stored value is decoded; encoding it again keeps any "+", "=" or
    space, and anything that slipped past the protocol core, inert)."""
    kind, _, address = orcpt.partition(";")
    return f"{kind};{xtext_encode(address)}"


def is_international(
    sender: str, mail_params: MailParams, recipients: Sequence[DsnRecipient]
) -> bool:
    """The notice is about an internationalised message (RFC 6533): the original
    carried SMTPUTF8, or an address it names is not ASCII."""
    if mail_params.smtputf8 or not sender.isascii():
        return True
    return any(
        not r.recipient.isascii()
        or not (r.original or "").isascii()
        or not (r.params.orcpt or "").isascii()
        for r in recipients
    )


def notice_params(
    sender: str, mail_params: MailParams, recipients: Sequence[DsnRecipient]
) -> MailParams:
    """The envelope parameters of a notice about ``mail_params``' message:
    REQUIRETLS kept (RFC 8689 §5), SMTPUTF8 for an internationalised one (RFC
    6533 §6: said where the next hop offers it; the protocol core sends an
    all-ASCII envelope without it), BODY=8BITMIME when the original was 8-bit
    or the notice's parts are UTF-8."""
    international = is_international(sender, mail_params, recipients)
    eight_bit = international or mail_params.body is not BodyType.SEVEN_BIT
    return MailParams(
        requiretls=mail_params.requiretls,
        smtputf8=international,
        body=BodyType.EIGHT_BIT_MIME if eight_bit else BodyType.SEVEN_BIT,
    )


def _address_field(address: str) -> str:
    """RFC 6533 §3: a non-ASCII address is of type utf-8, an ASCII one rfc822."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {_text(address)}"


def diagnostic_code(reply: Reply) -> list[str]:
    """RFC 3464 §2.3.6 ``Diagnostic-Code: smtp; ...``; a multi-line reply is
    folded (each further line starts with whitespace, RFC 5322 §2.2.3) so it
    stays one field instead of becoming lines of its own."""
    first, *rest = reply.lines
    head = f"Diagnostic-Code: smtp; {reply.code} {_status(reply)} {_text(first)}".rstrip()
    return [head, *(f"    {_text(line)}" for line in rest if line.strip())]


@dataclass(frozen=True, slots=True)
class DsnFrame:
    """A notification around the part of the original it returns: ``head``,
    then the original's bytes (whole when ``full``, else its header section),
    then ``tail``. Lets the original stream from the store into intake."""

    head: bytes
    tail: bytes
    full: bool


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    mail_params: MailParams,
    received_at: float,
    recipients: Sequence[DsnRecipient],
    original: Iterable[bytes],
    original_size: int,
    now: float,
) -> bytes:
    """The complete notification message (CRLF line endings), for a caller
    that holds the original in memory; ``dsn/notify.py`` streams it instead."""
    frame = dsn_frame(
        hostname=hostname,
        queue_id=queue_id,
        sender=sender,
        mail_params=mail_params,
        received_at=received_at,
        recipients=recipients,
        original_size=original_size,
        now=now,
    )
    body = b"".join(original)
    if not frame.full:
        end = body.find(b"\r\n\r\n")
        body = body[: end + 2] if end >= 0 else body[:HEADER_LIMIT]
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return frame.head + body + frame.tail


def dsn_frame(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    mail_params: MailParams,
    received_at: float,
    recipients: Sequence[DsnRecipient],
    original_size: int,
    now: float,
) -> DsnFrame:
    """The notification without the original's bytes (see ``DsnFrame``)."""
    boundary = f"{queue_id}.{secrets.token_hex(6)}/{hostname}"
    # RFC 6533: about an internationalised message, the report and the returned
    # message are the "global" types, which carry UTF-8 as it is.
    international = is_international(sender, mail_params, recipients)
    report_type = "global-delivery-status" if international else "delivery-status"
    delayed = all(r.action == "delayed" for r in recipients)
    success = all(r.action in ("delivered", "relayed") for r in recipients)
    if delayed:
        subject = "Delayed Mail (still being retried)"
    elif success:
        subject = "Successful Mail Delivery Report"
    else:
        subject = "Undelivered Mail Returned to Sender"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if delayed:
        lines += [
            "Your message could not be delivered yet. The mail system will keep",
            "trying; you do not need to send it again.",
        ]
    elif success:
        lines += ["Your message was successfully delivered to the recipients below."]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    lines.append("")
    for r in recipients:
        via = f" (remote host {r.remote})" if r.remote else ""
        lines.append(f"<{r.recipient}>: {r.action}{via}: {_text(str(r.reply))}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: message/{report_type}",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Postillon-Queue-ID: {queue_id}",
    ]
    if mail_params.envid:
        # RFC 3464 §2.2.1: the envelope id as the ENVID parameter carried it (xtext).
        lines.append(f"Original-Envelope-Id: {xtext_encode(mail_params.envid)}")
    lines.append(f"Arrival-Date: {formatdate(received_at, usegmt=True)}")
    for r in recipients:
        lines.append("")
        lines.append(f"Final-Recipient: {_address_field(r.recipient)}")
        if r.params.orcpt:
            lines.append(f"Original-Recipient: {_orcpt(r.params.orcpt)}")
        elif r.original:
            lines.append(f"Original-Recipient: {_address_field(r.original)}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {_status(r.reply)}")
        if r.remote:
            lines.append(f"Remote-MTA: dns; {r.remote}")
        lines += diagnostic_code(r.reply)
        lines.append(f"Last-Attempt-Date: {formatdate(now, usegmt=True)}")
    full = returns_full_message(mail_params, original_size, recipients[0].action)
    lines += ["", f"--{boundary}"]
    if full:
        kind = "message/global" if international else "message/rfc822"
        lines += ["Content-Description: Undelivered Message", f"Content-Type: {kind}", ""]
    else:
        kind = "message/global-headers" if international else "text/rfc822-headers"
        lines += ["Content-Description: Undelivered Message Headers", f"Content-Type: {kind}", ""]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return DsnFrame(head, f"\r\n--{boundary}--\r\n".encode(), full)
