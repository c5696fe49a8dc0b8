"""Issue 18 items 1-3 and 14 (the pure parts): client and remote text never
becomes a line of its own in a DSN or a log line, URLs never show their
password, and a RET=FULL notice streams the original instead of holding it.

The same attacks through the real server are in
``tests/integration/test_injection.py`` and ``tests/transcripts/dsn_param_injection.smtp``.
"""

from __future__ import annotations

import email
import hashlib
import io
import logging
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postillon.config.loader import ConfigError, parse_config
from postillon.core.credentials import parse_smarthost_url, redact, url_password
from postillon.core.envelope import DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.dsn.bounce import DsnRecipient, build_dsn
from postillon.dsn.notify import queue_notice
from postillon.intake.intake import Intake
from postillon.observability.logtext import SafeFormatter, escape_controls
from postillon.observability.maillog import MailLog
from postillon.outbound.client_session import SessionError
from postillon.outbound.smtp_transport import _failure
from postillon.protocol import replies as R
from postillon.protocol.commands import parse_mail_params
from postillon.protocol.errors import ProtocolError
from postillon.protocol.settings import ServerSettings
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo, NewMessage

HOSTILE = Reply(
    550,
    "5.1.1",
    ("no such user", "ABCDEF1234: delivered: to=<ceo@victim.test>, status=sent", "\x1b[2Jgone"),
)


# -- item 1: ENVID / ORCPT / AUTH ------------------------------------------------


def test_auth_param_with_line_break_is_refused() -> None:
    settings = ServerSettings(hostname="mx.test", auth_mechanisms=("PLAIN",))
    with pytest.raises(ProtocolError) as caught:
        parse_mail_params(["AUTH=a+0D+0Ab@example.org"], settings)
    assert caught.value.reply == R.BAD_PARAM_VALUE
    assert parse_mail_params(["AUTH=a+2Bb@example.org"], settings).auth == "a+b@example.org"


def _dsn(params: MailParams, rcpt: RcptParams, reply: Reply = HOSTILE) -> bytes:
    return build_dsn(
        hostname="mx.test",
        queue_id="Q1",
        sender="alice@example.org",
        mail_params=params,
        received_at=0.0,
        recipients=[DsnRecipient("bob@example.net", None, rcpt, reply, remote="mx.example.net")],
        original=[b"Subject: hi\r\n\r\nbody\r\n"],
        original_size=23,
        now=0.0,
    )


def test_dsn_writes_envid_and_orcpt_xtext_encoded() -> None:
    # Values stored before the protocol core refused them (or by a future bug)
    # must still not break out of their field.
    params = MailParams(envid="a+b=c d\r\nBcc: victim@example.net")
    rcpt = RcptParams(orcpt="rfc822;bob+x@example.net\r\nX-Injected: yes")
    text = _dsn(params, rcpt).decode()
    assert "Original-Envelope-Id: a+2Bb+3Dc+20d+0D+0ABcc:+20victim@example.net\r\n" in text
    assert "Original-Recipient: rfc822;bob+2Bx@example.net+0D+0AX-Injected:+20yes\r\n" in text
    assert "\r\nBcc:" not in text and "\r\nX-Injected" not in text


def test_dsn_folds_a_multiline_remote_reply() -> None:
    text = _dsn(MailParams(), RcptParams()).decode()
    report = email.message_from_string(text.replace("\r\n", "\n"))
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    per_recipient = status.get_payload()[1]
    assert "ABCDEF1234: delivered" in per_recipient["Diagnostic-Code"]  # one field
    assert "ABCDEF1234" not in per_recipient  # not a field of its own
    start = text.index("Diagnostic-Code:")
    field = text[start : text.index("Last-Attempt-Date:", start)]
    lines = field.split("\r\n")[:-1]
    assert lines[0] == "Diagnostic-Code: smtp; 550 5.1.1 no such user"
    assert all(line.startswith(" ") for line in lines[1:])  # folded, one field
    assert "\x1b" not in text and "ABCDEF1234: delivered" in lines[1]


# -- item 2: log lines -----------------------------------------------------------


def _log_text(fmt: str, **fields: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(message)s"))
    logger = logging.getLogger(f"test.injection.{fmt}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    MailLog(logger, fmt).event("bounced", "Q1", **fields)  # type: ignore[arg-type]
    return stream.getvalue()


def test_mail_log_text_line_cannot_be_split_or_carry_escapes() -> None:
    out = _log_text("text", to="bob@example.net", reply=HOSTILE.text)
    assert out.count("\n") == 1 and "\r" not in out and "\x1b" not in out
    assert "no such user\\nABCDEF1234: delivered" in out
    assert "\\x1b[2Jgone" in out


def test_mail_log_json_line_stays_one_valid_record() -> None:
    import json

    out = _log_text("json", reply="a\x7fb\u2028c\x85d\ne")
    assert out.count("\n") == 1
    assert json.loads(out)["reply"] == "a\x7fb\u2028c\x85d\ne"
    assert not any(c in out for c in "\x7f\u2028\x85")


def test_traceback_lines_are_indented_and_escaped() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise ValueError("boom\nQ2: delivered: to=<x@y>\x1b[0m")
    except ValueError:
        record.exc_info = sys.exc_info()
    out = SafeFormatter("%(message)s").format(record)
    first, *rest = out.split("\n")
    assert first == "failed" and rest
    assert all(line.startswith("\t") for line in rest) and "\x1b" not in out


def test_escape_controls_leaves_ordinary_text_alone() -> None:
    assert escape_controls("héllo wörld (ok)") == "héllo wörld (ok)"
    assert escape_controls("a\tb\x00c\u2029") == "a\\tb\\x00c\\u2029"


def test_multiline_permanent_reply_made_temporary_keeps_one_line() -> None:
    # One host refused permanently (multi-line), another failed temporarily:
    # the made-up 451 used to put "\n" into a Reply line and raise ValueError.
    errors = [SessionError("mx1: timeout"), SessionError("mx2", reply=HOSTILE, permanent=True)]
    outcome = _failure(errors, "mx.example.net")
    assert outcome.reply.code == 451 and len(outcome.reply.lines) == 1


# -- item 3: passwords -----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["smtp://bob:s3cr#t@host:587", "smtps://bob:s3cr@t@host", "postgresql://bob:s3cr/t@db/queue"],
)
def test_redact_hides_the_password(url: str) -> None:
    assert url_password(url) == ("s3cr" + url.split("s3cr")[1].split("@host")[0].split("@db")[0],)
    for text in (f"bad URL {url} here", f"bad URL {url!r}", f'{{"url": "{url}"}}'):
        out = redact(text)
        assert "s3cr" not in out and "bob" in out, out
    # A fragment of the password, as asyncpg quotes it, goes with the known password.
    assert redact("invalid literal: 's3cr#tail'", "s3cr#tail") == "invalid literal: '***'"


def test_password_with_hash_fails_the_config_check_without_showing_it() -> None:
    data = {"relay": {"smarthost": "smtp://bob:pa#ss123@relay.test:587"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "/etc/postillon/postillon.toml")
    message = str(caught.value)
    assert "relay.smarthost" in message and "%23" in message
    assert "pa#ss123" not in message and "ss123" not in message


def test_encoded_password_parses_to_the_same_hop_the_server_uses() -> None:
    url = "smtp://bob:pa%23ss@relay.test"
    parse_config({"relay": {"smarthost": url}})
    hop = parse_smarthost_url(url)
    assert (hop.host, hop.port, hop.password) == ("relay.test", 587, "pa#ss")


def test_postgresql_dsn_with_hash_fails_the_config_check_without_showing_it() -> None:
    data = {"queue": {"store": "postgresql", "dsn": "postgresql://q:se#cret99@db/queue"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert "queue" in str(caught.value) and "cret99" not in str(caught.value)


# -- item 14: a RET=FULL notice streams the original -----------------------------

BIG = 8 * 1024 * 1024
CHUNK = 256 * 1024


class StreamingStore:
    """Just enough of a store: bodies are generated on read and hashed on commit,
    so the only copies of a message in memory are the ones the notice makes."""

    def __init__(self) -> None:
        self.committed: list[tuple[NewMessage, str, int]] = []

    async def read_body(self, queue_id: str) -> AsyncIterator[bytes]:
        yield b"Subject: big\r\n\r\n"
        for i in range(BIG // CHUNK):
            yield bytes([65 + i % 26]) * (CHUNK - 2) + b"\r\n"

    async def commit(self, message: NewMessage) -> None:
        digest = hashlib.sha256()
        size = 0
        while data := message.body.read(CHUNK):
            digest.update(data)
            size += len(data)
        self.committed.append((message, digest.hexdigest(), size))


async def test_ret_full_notice_does_not_hold_the_message_in_memory(tmp_path: Path) -> None:
    store = StreamingStore()
    intake = Intake(store, "mx.test", tmp_path / "spool")  # type: ignore[arg-type]
    record = DeliveryRecord(
        1,
        "Q1",
        "bob@example.net",
        None,
        RcptParams(),
        DeliveryState.FAILED,
        1,
        0.0,
        HOSTILE,
        None,
        None,
        None,
        0.0,
    )
    message = MessageInfo(
        "Q1", "alice@example.org", MailParams(ret=DsnRet.FULL), BIG + 16, 0.0, "", "smtp", (record,)
    )
    notice = [DsnRecipient("bob@example.net", None, RcptParams(), HOSTILE)]
    tracemalloc.start()
    try:
        await queue_notice(store, intake, "mx.test", message, notice, 0.0)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ((_, _, size),) = store.committed
    assert size > BIG  # the whole original went back
    assert peak < 3 * 1024 * 1024, f"peak {peak} bytes for an {BIG}-byte original"
