"""The session's side of the policy pipeline: what it shows the checks, what it does
with their answers. No decisions here (they are ``checks``'); only translation
between intake's transaction and the pipeline's values.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

from postillon.checks.context import ClientFacts, ListenerKind
from postillon.checks.pipeline import MessageVerdict
from postillon.core.address import AddressError, parse_path
from postillon.core.envelope import NewRecipient, RcptParams
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import IntakeTransaction


async def greet_pause(reader: asyncio.StreamReader, pause: float) -> bytes:
    """Wait ``pause`` seconds before the greeting, reading: what the client said
    meanwhile (a pregreet), b"" when it waited as it should."""
    if pause <= 0:
        return b""
    try:
        async with asyncio.timeout(pause):
            said = await reader.read(1024)
    except TimeoutError:
        return b""
    if not said:
        raise ConnectionResetError("the client left before the greeting")
    return said


def new_session_id() -> str:
    """``S`` and 11 random base-32 characters: never mistaken for a queue id (17)."""
    return "S" + secrets.token_hex(6)[:11].upper()


def client_facts(
    client: ClientInfo,
    kind: ListenerKind,
    hostname: str,
    *,
    port: int = 0,
    trusted: bool = False,
    username: str = "",
    known: ClientFacts | None = None,
) -> ClientFacts:
    """The checks' view of ``client``; what only checks know (reverse DNS found at
    connect, pregreet) is kept from ``known``."""
    tls_version, _, cipher = client.tls.partition(" ")
    return ClientFacts(
        ip=client.ip,
        port=known.port if known is not None else port,
        listener=client.listener,
        kind=kind,
        hostname=hostname,
        local_ips=known.local_ips if known is not None else (),
        rdns=client.rdns,
        rdns_status=known.rdns_status if known is not None else "",
        helo=client.helo,
        esmtp=client.esmtp,
        tls_version=tls_version,
        tls_cipher=cipher,
        authenticated=client.authenticated,
        username=username,
        trusted=trusted,
        pregreet=known.pregreet if known is not None else b"",
        hide_ip=client.hide_ip,
    )


class SpoolView:
    """``checks.context.MessageView`` over an intake transaction's spool."""

    def __init__(self, tx: IntakeTransaction) -> None:
        self._tx = tx

    @property
    def header(self) -> bytes:
        return self._tx.header_block

    @property
    def prepend(self) -> bytes:
        return b""

    @property
    def size(self) -> int:
        return self._tx.size

    def message_bytes(self) -> bytes:
        return self._tx.message_bytes()

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        return self._tx.body_chunks(size)


def apply_verdict(tx: IntakeTransaction, verdict: MessageVerdict) -> None:
    """Make the transaction what the checks asked for (the verdict accepted it)."""
    if verdict.prepend or verdict.header_changed:
        tx.rewrite_header(verdict.prepend, verdict.header)
    if verdict.body is not None:
        tx.replace_body(verdict.body)
    if verdict.sender is not None:
        tx.sender = verdict.sender
    if verdict.removed:
        gone = {a.lower() for a in verdict.removed}
        tx.recipients = [
            r for r in tx.recipients if r.address.lower() not in gone
            and (r.original or "").lower() not in gone
        ]  # fmt: skip
    for address in verdict.added:
        try:
            parse_path(f"<{address}>", smtputf8=True)
        except AddressError:
            continue  # a check's bad address is not the client's fault; skip it
        tx.add_recipient(NewRecipient(address, RcptParams()))
