"""[[policy_service]]: the Postfix policy delegation check against real servers on loopback.

    check (postillon) --name=value--> tiny policy server (asyncio, this file) / postgrey

A hand-written server answers each action variant; postgrey (Debian's, a real policy
server) greylists a triplet and passes it after its delay; a server that is down, stalls,
closes mid-answer or sends garbage leads to ``default_action``, never a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from postillon.checks.context import ClientFacts, RecipientFacts, SessionContext, TransactionContext
from postillon.checks.decision import AddHeader
from postillon.checks.policy_service import PolicyServiceCheck, PolicyServiceClient
from postillon.config.inbound_filters import PolicyServiceConfig
from support.ports import free_port
from support.postgrey import Postgrey, PostgreyNotInstalled


@dataclass
class TinyPolicyServer:
    """Answers each request with ``answer(attributes)`` (bytes, sent as is)."""

    answer: Callable[[dict[str, str]], bytes]
    requests: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        attrs: dict[str, str] = {}
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition("=")
                    attrs[name] = value
                    continue
                self.requests.append(attrs)
                writer.write(self.answer(attrs))
                await writer.drain()
                attrs = {}
        finally:
            writer.close()


@pytest.fixture
async def tiny() -> AsyncIterator[tuple[TinyPolicyServer, str]]:
    server = TinyPolicyServer(lambda a: b"action=DUNNO\n\n")
    port = free_port()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
    yield server, f"inet:127.0.0.1:{port}"
    listener.close()


def make_check(address: str, default: str = "tempfail", timeout: float = 2.0) -> PolicyServiceCheck:
    config = PolicyServiceConfig(
        name="p",
        address=address,
        timeout=timeout,
        default_action=default,  # type: ignore[arg-type]
    )
    return PolicyServiceCheck(config, PolicyServiceClient(config.address, config.timeout))


def session(ip: str = "192.0.2.7") -> tuple[SessionContext, TransactionContext]:
    s = SessionContext("S1", ClientFacts(ip=ip, helo="mx.example.net", port=40000))
    return s, TransactionContext("alice@example.net", queue_id="Q1")


@pytest.mark.parametrize(
    ("answer", "action", "code"),
    [
        ("DUNNO", "continue", None),
        ("OK", "continue", None),
        ("REJECT not you", "reject", 554),
        ("DEFER_IF_PERMIT Greylisted", "reject", 450),
        ("451 4.7.1 slow down", "reject", 451),
        ("DISCARD", "discard", None),
        ("HOLD check it", "quarantine", None),
        ("REDIRECT x@example.org", "continue", None),
    ],
)
async def test_actions_from_a_tiny_server(
    tiny: tuple[TinyPolicyServer, str], answer: str, action: str, code: int | None
) -> None:
    server, address = tiny
    server.answer = lambda a: f"action={answer}\n\n".encode()
    check = make_check(address)
    s, tx = session()
    decision = await check.rcpt(s, tx, RecipientFacts("bob@example.org"))
    assert decision.action == action
    assert (decision.reply.code if decision.reply else None) == code
    sent = server.requests[-1]
    assert sent["request"] == "smtpd_access_policy"
    assert sent["protocol_state"] == "RCPT"
    assert sent["client_address"] == "192.0.2.7"
    assert sent["helo_name"] == "mx.example.net"
    assert sent["sender"] == "alice@example.net"
    assert sent["recipient"] == "bob@example.org"
    await check.client.close()


async def test_prepend_lands_at_end_of_data_and_connections_are_reused(
    tiny: tuple[TinyPolicyServer, str],
) -> None:
    server, address = tiny
    server.answer = lambda a: (
        b"action=PREPEND X-Policy: checked " + a["recipient"].encode() + b"\n\n"
    )
    check = make_check(address)
    s, tx = session()
    for rcpt in ("a@example.org", "b@example.org"):
        assert (await check.rcpt(s, tx, RecipientFacts(rcpt))).action == "continue"
    decision = await check.end_of_data(s, tx, None)  # type: ignore[arg-type]
    assert decision.changes == (
        AddHeader("X-Policy", "checked a@example.org"),
        AddHeader("X-Policy", "checked b@example.org"),
    )
    assert server.connections == 1  # one connection for both requests
    await check.client.close()


async def test_a_connection_the_server_closed_is_replaced(
    tiny: tuple[TinyPolicyServer, str],
) -> None:
    server, address = tiny
    check = make_check(address)
    s, tx = session()
    assert (await check.rcpt(s, tx, RecipientFacts("a@example.org"))).action == "continue"
    # The server drops idle connections (postgrey's --exim mode, a restart):
    for _, writer in check.client._idle:
        writer.transport.abort()
    assert (await check.rcpt(s, tx, RecipientFacts("b@example.org"))).action == "continue"
    assert len(server.requests) == 2
    await check.client.close()


async def _stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\n\n")
    writer.write(b"\x00\xffnot the protocol\n\n")
    await writer.drain()


async def _half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\n\n")
    writer.write(b"action=REJ")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("behaviour", ["down", "stall", "garbage", "half"])
@pytest.mark.parametrize("default", ["tempfail", "accept", "reject"])
async def test_a_broken_server_gets_the_default_action(behaviour: str, default: str) -> None:
    port = free_port()
    handlers = {"stall": _stall, "garbage": _garbage, "half": _half}
    listener = None
    if behaviour != "down":
        listener = await asyncio.start_server(handlers[behaviour], "127.0.0.1", port)
    try:
        check = make_check(f"inet:127.0.0.1:{port}", default, timeout=0.5)
        s, tx = session()
        decision = await asyncio.wait_for(check.rcpt(s, tx, RecipientFacts("b@example.org")), 10)
        expected = {
            "tempfail": (451, "reject"),
            "accept": (None, "continue"),
            "reject": (550, "reject"),
        }
        assert ((decision.reply.code if decision.reply else None), decision.action) == expected[
            default
        ]
        assert "default" in decision.saw
    finally:
        if listener is not None:
            listener.close()


async def test_postgrey_greylists_then_passes_after_its_delay() -> None:
    try:
        postgrey = Postgrey(delay=1).start()
    except PostgreyNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        check = make_check(postgrey.address, timeout=10)
        s, tx = session("198.51.100.20")
        first = await check.rcpt(s, tx, RecipientFacts("bob@example.org"))
        assert first.action == "reject" and first.reply is not None
        assert first.reply.code == 450 and "Greylisted" in first.reply.text
        # Poll until postgrey's delay is over (never assert on wall-clock time).
        for _ in range(100):
            await asyncio.sleep(0.2)
            s2, tx2 = session("198.51.100.21")  # the same /24: postgrey's triplet too
            retry = await check.rcpt(s2, tx2, RecipientFacts("bob@example.org"))
            if retry.action == "continue":
                break
        assert retry.action == "continue", postgrey.log()
        eod = await check.end_of_data(s2, tx2, None)  # type: ignore[arg-type]
        assert len(eod.changes) == 1
        header = eod.changes[0]
        assert isinstance(header, AddHeader) and header.name == "X-Greylist"
        assert "postgrey" in header.value
        await check.client.close()
    finally:
        postgrey.stop()


class _Message:
    size = 1234
    header = b"Subject: x\r\n"
    prepend = b""


@pytest.mark.parametrize("phase", ["mail", "data", "end_of_data"])
async def test_other_phases_send_their_protocol_state(
    tiny: tuple[TinyPolicyServer, str], phase: str
) -> None:
    server, address = tiny
    server.answer = lambda a: b"action=PREPEND X-Phase: " + a["protocol_state"].encode() + b"\n\n"
    config = PolicyServiceConfig(name="p", address=address, phase=phase)  # type: ignore[arg-type]
    check = PolicyServiceCheck(config, PolicyServiceClient(config.address, config.timeout))
    assert check.phases == {phase, "end_of_data"}
    s, tx = session()
    tx.recipients.append(RecipientFacts("bob@example.org", targets=("bob@example.org",)))
    if phase == "mail":
        assert (await check.mail(s, tx)).action == "continue"
    elif phase == "data":
        assert (await check.data(s, tx)).action == "continue"
    eod = await check.end_of_data(s, tx, _Message())  # type: ignore[arg-type]
    state = {"mail": "MAIL", "data": "DATA", "end_of_data": "END-OF-MESSAGE"}[phase]
    assert eod.changes == (AddHeader("X-Phase", state),)
    sent = server.requests[-1]
    assert sent["protocol_state"] == state
    if phase == "end_of_data":
        assert sent["size"] == "1234" and sent["recipient_count"] == "1"
    await check.client.close()
