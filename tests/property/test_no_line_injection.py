"""Hypothesis (issue 18): no byte string from a client or a remote server puts
a CR or LF into a mail-log line (text or JSON format) or into a header postillon
generates (DSN fields, Received:).

* A remote server's reply, any bytes, goes through the real sans-IO client
  (``ClientConnection``), then into the mail log and into a DSN.
* A client's ENVID and ORCPT, any bytes xtext-encoded, go through the real
  parameter parser, then into a DSN.
* A client's HELO name goes through ``parse_hello`` into Received:.

What is checked is the output's line structure: a log record is one line;
every line of a generated header section is a known field or a folded
continuation (starts with whitespace); no bare CR or LF anywhere.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.config.model import LogConfig
from postillon.core.envelope import MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.dsn.bounce import DsnRecipient, build_dsn
from postillon.intake.headers import ClientInfo, received_header
from postillon.observability.maillog import MailLog, _handler
from postillon.protocol.client import ClientConnection
from postillon.protocol.client_events import Greeting
from postillon.protocol.commands import parse_hello, parse_mail_params, parse_rcpt_params
from postillon.protocol.errors import ProtocolError
from postillon.protocol.settings import ServerSettings

SETTINGS = ServerSettings(hostname="mx.test")
# The fields a DSN's header and delivery-status sections may hold (RFC 3464 §2).
_DSN_FIELD = re.compile(
    r"(From|To|Subject|Date|Message-ID|Auto-Submitted|MIME-Version|Content-Type|"
    r"Content-Description|Reporting-MTA|X-Postillon-Queue-ID|Original-Envelope-Id|"
    r"Arrival-Date|Final-Recipient|Original-Recipient|Action|Status|Remote-MTA|"
    r"Diagnostic-Code|Last-Attempt-Date): "
)

hostile_bytes = st.binary(max_size=120) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\x1b[2J", b"\x00", b"\x7f", b"\xc2\x85", b"x", b" "]),
    max_size=20,
).map(b"".join)


def _log_lines(fmt: Literal["text", "json"], **fields: str) -> list[str]:
    """One mail-log event through the handler and formatter the server configures."""
    stream = io.StringIO()
    handler = _handler(LogConfig(format=fmt), "mx.test")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger(f"test.property.injection.{fmt}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    MailLog(logger, fmt).event("bounced", "Q1", **fields)
    out = stream.getvalue()
    assert "\r" not in out and out.endswith("\n") and out.count("\n") == 1, repr(out)
    return out.splitlines()


def _dsn_header_lines(reply: Reply, params: MailParams, rcpt: RcptParams) -> list[str]:
    raw = build_dsn(
        hostname="mx.test",
        queue_id="Q1",
        sender="alice@example.org",
        mail_params=params,
        received_at=0.0,
        recipients=[DsnRecipient("bob@example.net", None, rcpt, reply, remote="mx.example.net")],
        original=[b"Subject: x\r\n\r\nbody\r\n"],
        original_size=22,
        now=0.0,
    )
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    text = raw.decode("utf-8")
    top = text.split("\r\n\r\n", 1)[0]
    report = text.split("Content-Type: message/delivery-status\r\n\r\n", 1)[1]
    report = report.split("\r\n\r\n--", 1)[0]
    lines = top.split("\r\n") + [line for line in report.split("\r\n") if line]
    for line in lines:
        assert _DSN_FIELD.match(line) or line[:1] in (" ", "\t"), repr(line)
    return lines


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_bytes, min_size=1, max_size=4), st.sampled_from([b"\r\n", b"\n"]))
def test_a_remote_reply_stays_in_its_log_line_and_dsn_field(lines: list[bytes], end: bytes) -> None:
    conn = ClientConnection("mx.test")
    conn.receive_data(
        b"".join(b"554-5.7.1 " + line + end for line in lines[:-1])
        + b"554 5.7.1 "
        + lines[-1]
        + end
    )
    event = conn.next_event()
    if not isinstance(event, Greeting):
        return  # not a reply at all (a line break inside a line): refused by the client
    reply = event.reply
    for fmt in ("text", "json"):
        (line,) = _log_lines(fmt, to="bob@example.net", reply=reply.text, status=str(reply))
        if fmt == "json":
            assert json.loads(line)["reply"] == reply.text
    _dsn_header_lines(reply, MailParams(), RcptParams())


def _xtext(data: bytes) -> str:
    return "".join(f"+{b:02X}" for b in data) or "x"


@settings(max_examples=300, deadline=None)
@given(hostile_bytes, hostile_bytes)
def test_client_envid_and_orcpt_never_add_dsn_lines(envid: bytes, orcpt: bytes) -> None:
    try:
        params = parse_mail_params([f"ENVID={_xtext(envid)}"], SETTINGS)
    except ProtocolError:
        params = MailParams()
    try:
        rcpt = parse_rcpt_params([f"ORCPT=rfc822;{_xtext(orcpt)}"], SETTINGS)
    except ProtocolError:
        rcpt = RcptParams()
    lines = _dsn_header_lines(Reply.of(550, "5.1.1", "no"), params, rcpt)
    assert sum(line.startswith("Original-Envelope-Id") for line in lines) == bool(params.envid)
    _log_lines("text", envid=params.envid or "", orcpt=rcpt.orcpt or "")


@settings(max_examples=300, deadline=None)
@given(hostile_bytes)
def test_client_hello_name_never_adds_received_lines(name: bytes) -> None:
    try:
        helo = parse_hello(name.decode("utf-8", "replace"))
    except ProtocolError:
        return
    header = received_header(
        ClientInfo(ip="192.0.2.1", helo=helo), "mx.test", "Q1", "bob@example.net", 0.0
    )
    text = header.decode()
    assert text.endswith("\r\n")
    first, *rest = text[:-2].split("\r\n")
    assert first.startswith("Received: from ") and all(line.startswith("\t") for line in rest)
    assert "\r" not in text.replace("\r\n", "") and "\n" not in text.replace("\r\n", "")
    _log_lines("text", client=ClientInfo(ip="192.0.2.1", helo=helo).describe())
