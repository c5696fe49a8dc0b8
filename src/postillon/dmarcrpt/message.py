"""The DMARC aggregate report as a message (RFC 7489 §7.2.1.1). Pure: bytes out.

``Subject: Report Domain: D Submitter: S Report-ID: <id>``; the gzipped XML as an
``application/gzip`` attachment with the §7.2.1.1 file name, after a short text part.
DKIM signing is intake's job (as for TLS reports).
"""

from __future__ import annotations

import email.policy
from collections.abc import Sequence
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from postillon.dmarcrpt.report import BuiltReport

__all__ = ["report_message"]


def report_message(
    report: BuiltReport, *, sender: str, recipients: Sequence[str], submitter: str, now: float
) -> bytes:
    msg = MIMEMultipart("mixed", policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(now)
    msg["Subject"] = (
        f"Report Domain: {report.domain} Submitter: {submitter} Report-ID: <{report.report_id}>"
    )
    msg["Message-ID"] = make_msgid("dmarc", domain=submitter)
    text = (
        f"This is a DMARC aggregate report (RFC 7489) from {submitter} for {report.domain},\r\n"
        f"UTC day {report.day}: {report.messages} message(s) evaluated.\r\n"
    )
    msg.attach(MIMEText(text, "plain", "us-ascii", policy=email.policy.SMTP))
    part = MIMEApplication(report.gzipped, "gzip", name=report.filename, policy=email.policy.SMTP)
    part.add_header("Content-Disposition", "attachment", filename=report.filename)
    msg.attach(part)
    return msg.as_bytes(policy=email.policy.SMTP)
