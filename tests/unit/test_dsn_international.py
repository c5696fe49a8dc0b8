"""Notices about internationalised messages (RFC 6533) and the envelope a
notice goes with: SMTPUTF8 when the original had it, BODY=8BITMIME when the
original was 8-bit (dsn/bounce.py)."""

from __future__ import annotations

from postillon.core.envelope import BodyType, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.dsn.bounce import DsnRecipient, build_dsn, notice_params

REFUSED = Reply.of(550, "5.6.7", "Non-ASCII local part, SMTPUTF8 not supported by remote server")
ORIGINAL = "From: a@s.test\r\nSubject: Grüße\r\n\r\nhallo\r\n".encode()


def rcpt(address: str) -> DsnRecipient:
    return DsnRecipient(address, None, RcptParams(), REFUSED, "mx.d.test[192.0.2.1]")


def dsn(params: MailParams, *recipients: str) -> str:
    return build_dsn(
        hostname="mx.test",
        queue_id="Q1",
        sender="a@s.test",
        mail_params=params,
        received_at=0.0,
        recipients=[rcpt(r) for r in recipients],
        original=[ORIGINAL],
        original_size=len(ORIGINAL),
        now=0.0,
    ).decode()


def test_notice_about_an_smtputf8_message_uses_the_global_types() -> None:
    text = dsn(MailParams(smtputf8=True, body=BodyType.EIGHT_BIT_MIME), "jürgen@bücher.test")
    assert "report-type=global-delivery-status;" in text
    assert "Content-Type: message/global-delivery-status\r\n" in text
    assert "Final-Recipient: utf-8; jürgen@bücher.test\r\n" in text
    assert "Content-Type: message/global\r\n" in text


def test_notice_about_an_ascii_message_keeps_rfc_3464_types() -> None:
    text = dsn(MailParams(), "x@d.test")
    assert "report-type=delivery-status;" in text
    assert "Final-Recipient: rfc822; x@d.test\r\n" in text
    assert "Content-Type: message/rfc822\r\n" in text


def test_notice_envelope() -> None:
    plain = notice_params("a@s.test", MailParams(), [rcpt("x@d.test")])
    assert (plain.smtputf8, plain.body) == (False, BodyType.SEVEN_BIT)
    eight = notice_params("a@s.test", MailParams(body=BodyType.EIGHT_BIT_MIME), [rcpt("x@d.test")])
    assert (eight.smtputf8, eight.body) == (False, BodyType.EIGHT_BIT_MIME)
    utf8 = notice_params("a@s.test", MailParams(smtputf8=True), [rcpt("x@d.test")])
    assert (utf8.smtputf8, utf8.body) == (True, BodyType.EIGHT_BIT_MIME)
    # A non-ASCII address alone makes it international, REQUIRETLS is kept.
    kept = notice_params("a@s.test", MailParams(requiretls=True), [rcpt("jö@d.test")])
    assert kept.smtputf8 and kept.requiretls
