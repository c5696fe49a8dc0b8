"""``queue export`` / ``queue import`` carry REQUIRETLS and TLS-Required: No (RFC 8689):
a message moved between stores must not lose its requirement (a lost flag would let
it go out over unverified TLS)."""

from __future__ import annotations

import base64
import json

from postillon.cli.queue_transfer import _message_line, _new_message
from postillon.core.envelope import MailParams, RcptParams
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo


def _info(params: MailParams) -> MessageInfo:
    record = DeliveryRecord(
        record_id=1,
        queue_id="QX1",
        recipient="b@example.net",
        original_recipient=None,
        rcpt_params=RcptParams(),
        state=DeliveryState.PENDING,
        attempts=0,
        next_try=0.0,
        last_reply=None,
        lease_token=None,
        lease_owner=None,
        lease_expires=None,
        updated_at=0.0,
    )
    return MessageInfo(
        queue_id="QX1",
        sender="a@example.org",
        mail_params=params,
        size=4,
        received_at=1.0,
        client="",
        source="smtp",
        records=(record,),
    )


def test_export_import_round_trip_keeps_flags() -> None:
    for params in (MailParams(requiretls=True), MailParams(tls_required_no=True), MailParams()):
        line = _message_line(_info(params), b"x\r\n\r\n")
        assert line is not None
        line.setdefault("body", base64.b64encode(b"x\r\n\r\n").decode())
        data = json.loads(json.dumps(line))  # what the export file holds
        message, _ = _new_message(data)
        assert message.mail_params == params
    exported = _message_line(_info(MailParams(requiretls=True)), b"")
    assert exported is not None and exported["mail_params"] == {"requiretls": True}
