"""Build RFC 3464 delivery status notifications (bounces and delay warnings)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate

from postillon.core.envelope import DsnRet, MailParams, RcptParams
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
    if action == "delayed":
        return False
    if params.ret is DsnRet.FULL:
        return size <= FULL_RETURN_HARD_LIMIT
    return params.ret is None and size <= FULL_RETURN_LIMIT


async def read_for_dsn(chunks: AsyncIterator[bytes], full: bool) -> list[bytes]:
    """The part of the stored message a notification returns."""
    if full:
        return [chunk async for chunk in chunks]
    head = b""
    async for chunk in chunks:
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return [head[: end + 2]]
        if len(head) > HEADER_LIMIT:
            break
    return [head[:HEADER_LIMIT]]


def _status(reply: Reply) -> str:
    if reply.status:
        return reply.status
    return f"{str(reply.code)[0]}.0.0"


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
    """The complete notification message (CRLF line endings)."""
    boundary = f"{queue_id}.{secrets.token_hex(6)}/{hostname}"
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
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
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
        lines.append(f"<{r.recipient}>: {r.action}{via}: {r.reply}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Postillon-Queue-ID: {queue_id}",
    ]
    if mail_params.envid:
        lines.append(f"Original-Envelope-Id: {mail_params.envid}")
    lines.append(f"Arrival-Date: {formatdate(received_at, usegmt=True)}")
    for r in recipients:
        lines.append("")
        lines.append(f"Final-Recipient: rfc822; {r.recipient}")
        if r.params.orcpt:
            lines.append(f"Original-Recipient: {r.params.orcpt}")
        elif r.original:
            lines.append(f"Original-Recipient: rfc822; {r.original}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {_status(r.reply)}")
        if r.remote:
            lines.append(f"Remote-MTA: dns; {r.remote}")
        lines.append(f"Diagnostic-Code: smtp; {r.reply.code} {_status(r.reply)} {r.reply.text}")
        lines.append(f"Last-Attempt-Date: {formatdate(now, usegmt=True)}")
    full = returns_full_message(mail_params, original_size, recipients[0].action)
    lines += ["", f"--{boundary}"]
    if full:
        lines += ["Content-Description: Undelivered Message", "Content-Type: message/rfc822", ""]
    else:
        lines += [
            "Content-Description: Undelivered Message Headers",
            "Content-Type: text/rfc822-headers",
            "",
        ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    body = b"".join(original)
    if not full:
        end = body.find(b"\r\n\r\n")
        body = body[: end + 2] if end >= 0 else body[:HEADER_LIMIT]
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + body + tail
