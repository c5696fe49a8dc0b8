"""Intake notes "TLS-Required: No" (RFC 8689 §3) in the stored mail parameters, so
the transport can relax the destination's TLS policy for that message; with
REQUIRETLS on MAIL the header is ignored (§4.1). A body line is not a header."""

from __future__ import annotations

from pathlib import Path

import pytest

from postillon.core.envelope import MailParams
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import NewRecipient


@pytest.mark.parametrize(
    ("message", "params", "expected"),
    [
        (b"Subject: s\r\nTLS-Required: No\r\n\r\nbody\r\n", MailParams(), True),
        (b"tls-required:no\r\n\r\nbody\r\n", MailParams(), True),
        (b"Subject: s\r\nTLS-Required: No \r\n", MailParams(), True),  # no body at all
        (b"Subject: s\r\nTLS-Required: Yes\r\n\r\nbody\r\n", MailParams(), False),
        (b"Subject: s\r\nX-TLS-Required: No\r\n\r\nbody\r\n", MailParams(), False),
        (b"Subject: s\r\n\r\nTLS-Required: No\r\n", MailParams(), False),  # in the body
        (b"TLS-Required: No\r\n\r\nbody\r\n", MailParams(requiretls=True), False),
    ],
)
async def test_tls_required_no(
    tmp_path: Path, message: bytes, params: MailParams, expected: bool
) -> None:
    store = MemoryStore()
    tx = Intake(store, "mx", tmp_path).begin("a@x.example", params, ClientInfo(ip="192.0.2.1"))
    tx.add_recipient(NewRecipient("bob@y.example"))
    tx.start_body()
    tx.write(message)
    info = await store.get_message(await tx.commit())
    assert info is not None
    assert info.mail_params.tls_required_no is expected
    assert info.mail_params.requiretls is params.requiretls
