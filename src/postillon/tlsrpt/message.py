"""The report as a message (RFC 8460 §5.3). Pure: a built report in, bytes out.

* ``Subject: Report Domain: D Submitter: S Report-ID: <id>`` and the two header
  fields ``TLS-Report-Domain`` and ``TLS-Report-Submitter`` (§5.3);
* a ``multipart/report; report-type="tlsrpt"`` body: a short human-readable part,
  then the gzipped JSON as ``application/tlsrpt+gzip`` with its §5.1 file name;
* ``TLS-Required: No`` (RFC 8689 §5): RFC 8460 §3 asks that reports be delivered
  "despite any TLS-related failures" - a report about a broken policy must not be
  held back by that policy (honoured once REQUIRETLS, issue 14 item 5, lands).

DKIM (§5.3: reports SHOULD be signed) is intake's job: it signs for the From
domain when a key exists, as for any local message.
"""

from __future__ import annotations

import email.policy
from collections.abc import Sequence
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from postillon.tlsrpt.report import BuiltReport

__all__ = ["report_message"]


def report_message(
    report: BuiltReport,
    *,
    sender: str,
    recipients: Sequence[str],
    submitter: str,
    now: float,
) -> bytes:
    """The whole message, CRLF line ends, ready for intake."""
    msg = MIMEMultipart("report", report_type="tlsrpt", policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(now)
    msg["Subject"] = (
        f"Report Domain: {report.domain} Submitter: {submitter} Report-ID: <{report.report_id}>"
    )
    msg["Message-ID"] = make_msgid("tlsrpt", domain=submitter)
    msg["TLS-Report-Domain"] = report.domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {report.domain},\r\n"
        f"UTC day {report.day}: {report.successes} successful and {report.failures} failed"
        " TLS sessions.\r\n"
    )
    msg.attach(MIMEText(text, "plain", "us-ascii", policy=email.policy.SMTP))
    part = MIMEApplication(
        report.gzipped, "tlsrpt+gzip", name=report.filename, policy=email.policy.SMTP
    )
    part.add_header("Content-Disposition", "attachment", filename=report.filename)
    msg.attach(part)
    return msg.as_bytes(policy=email.policy.SMTP)
