"""How queue values are stored: envelope parameters and replies as compact JSON
text, and rows back into :class:`DeliveryRecord` / :class:`MessageInfo`.

One format for every store (SQLite, PostgreSQL) and for ``queue export``, so a
queue moved between stores keeps its values exactly. Row readers take the
columns in the order of the stores' ``SELECT`` lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

from postillon.core.envelope import BodyType, DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo, NewMessage


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_mail_params(p: MailParams) -> str:
    d: dict[str, Any] = {}
    if p.size is not None:
        d["size"] = p.size
    if p.body is not BodyType.SEVEN_BIT:
        d["body"] = p.body.value
    if p.smtputf8:
        d["smtputf8"] = True
    if p.ret is not None:
        d["ret"] = p.ret.value
    if p.envid is not None:
        d["envid"] = p.envid
    if p.auth is not None:
        d["auth"] = p.auth
    if p.requiretls:  # RFC 8689: the requirement travels with the message
        d["requiretls"] = True
    if p.tls_required_no:
        d["tls_required_no"] = True
    if p.mt_priority is not None:  # RFC 6710: relayed onward with the message
        d["mt_priority"] = p.mt_priority
    return _dumps(d)


def decode_mail_params(text: str) -> MailParams:
    d = json.loads(text)
    ret = d.get("ret")
    return MailParams(
        size=d.get("size"),
        body=BodyType(d.get("body", BodyType.SEVEN_BIT.value)),
        smtputf8=bool(d.get("smtputf8", False)),
        ret=DsnRet(ret) if ret is not None else None,
        envid=d.get("envid"),
        auth=d.get("auth"),
        requiretls=bool(d.get("requiretls", False)),
        tls_required_no=bool(d.get("tls_required_no", False)),
        mt_priority=d.get("mt_priority"),
    )


_DEFAULT_RCPT_PARAMS: Final = "{}"


def encode_rcpt_params(p: RcptParams) -> str:
    if not p.notify and p.orcpt is None:
        return _DEFAULT_RCPT_PARAMS
    d: dict[str, Any] = {}
    if p.notify:
        d["notify"] = sorted(p.notify)
    if p.orcpt is not None:
        d["orcpt"] = p.orcpt
    return _dumps(d)


def decode_rcpt_params(text: str) -> RcptParams:
    if text == _DEFAULT_RCPT_PARAMS:
        return RcptParams()
    d = json.loads(text)
    return RcptParams(notify=frozenset(d.get("notify", ())), orcpt=d.get("orcpt"))


def encode_reply(r: Reply) -> str:
    return _dumps({"code": r.code, "status": r.status, "lines": list(r.lines)})


def decode_reply(text: str | None) -> Reply | None:
    if text is None:
        return None
    d = json.loads(text)
    return Reply(int(d["code"]), d.get("status"), tuple(d.get("lines", ())))


def record_from_row(row: Sequence[Any]) -> DeliveryRecord:
    return DeliveryRecord(
        record_id=row[0],
        queue_id=row[1],
        recipient=row[2],
        original_recipient=row[3],
        rcpt_params=decode_rcpt_params(row[4]),
        state=DeliveryState(row[5]),
        attempts=row[6],
        next_try=row[7],
        last_reply=decode_reply(row[8]),
        lease_token=row[9],
        lease_owner=row[10],
        lease_expires=row[11],
        updated_at=row[12],
    )


def message_from_row(row: Sequence[Any], records: Iterable[DeliveryRecord]) -> MessageInfo:
    return MessageInfo(
        queue_id=row[0],
        sender=row[1],
        mail_params=decode_mail_params(row[2]),
        size=row[3],
        received_at=row[4],
        client=row[5],
        source=row[6],
        records=tuple(records),
    )


def record_rows(message: NewMessage, updated_at: float) -> list[tuple[Any, ...]]:
    """One row per recipient of a new message, due at once (held when the message
    is quarantined): (queue_id, recipient, original, rcpt_params, state, next_try,
    updated_at, priority)."""
    state = (DeliveryState.HELD if message.held else DeliveryState.PENDING).value
    return [
        (
            message.queue_id,
            r.address,
            r.original,
            encode_rcpt_params(r.params),
            state,
            message.received_at,  # due at once
            updated_at,
            message.priority,
        )
        for r in message.recipients
    ]
