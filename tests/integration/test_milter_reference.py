"""The milter check against libmilter's reference implementation (pymilter), and
against milters that fail: down, stalling, closing mid-dialogue, sending garbage.

Each failure must end in the milter's ``default_action`` (never a hang or a crash),
and every reply and modification action must come through the pipeline as the
decision the session applies."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postillon.checks.context import ClientFacts
from postillon.config.milter import MilterConfig
from support.milter_pipeline import milter_pipeline, run_session
from support.milters import ReferenceMilter
from support.ports import free_port

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: hello\r\n"
    b"X-Remove-Me: please\r\n"
    b"X-Milter-Test: %s\r\n"
    b"\r\n"
    b"Hello, world.\r\n"
)


@pytest.fixture(scope="module")
def reference() -> Iterator[ReferenceMilter]:
    with ReferenceMilter() as milter:
        yield milter


def ref(milter: ReferenceMilter, **kw: object) -> MilterConfig:
    return MilterConfig(name="reference", address=milter.address, timeout=5, **kw)  # type: ignore[arg-type]


def msg(actions: str) -> bytes:
    return MESSAGE % actions.encode()


async def test_clean_message_and_macros(reference: ReferenceMilter) -> None:
    before = len(reference.records())
    client = ClientFacts(
        ip="192.0.2.7",
        port=40001,
        listener="smtp:127.0.0.1:25",
        helo="client.example.net",
        rdns="client.example.net",
        rdns_status="ok",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        authenticated=True,
        username="alice",
    )
    run = await run_session(
        milter_pipeline(ref(reference)), msg("none"), client=client, queue_id="Q42"
    )
    assert run.refused == ""
    assert run.message is not None and not run.message.header_changed
    record = reference.wait_records(before + 1)[-1]
    assert record["connect"] == {"hostname": "client.example.net", "hostaddr": ["192.0.2.7", 40001]}
    assert record["helo"] == "client.example.net"
    assert record["sender"] == "<sender@example.net>"
    assert record["rcpts"] == ["<alice@example.org>"]
    assert ["Subject", "hello"] in record["headers"]
    assert record["body"] == "Hello, world.\r\n"
    macros = record["macros"]
    assert macros["connect"] == {
        "j": "mx.example.org",
        "{daemon_name}": "smtp:127.0.0.1:25",
        "{client_addr}": "192.0.2.7",
        "{client_port}": "40001",
        "{client_name}": "client.example.net",
        "_": "client.example.net [192.0.2.7]",
    }
    assert macros["helo"] == {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384"}
    assert macros["envfrom"] == {
        "i": "Q42",
        "{auth_authen}": "alice",
        "{mail_addr}": "sender@example.net",
    }
    assert macros["envrcpt"] == {"{rcpt_addr}": "alice@example.org"}
    assert macros["eom"] == {"i": "Q42"}
    # The explain trace names the milter and what it said.
    assert any(s.check == "milter" and "reference: continue" in s.saw for s in run.trace)


async def test_reject_with_the_milters_reply_text(reference: ReferenceMilter) -> None:
    run = await run_session(milter_pipeline(ref(reference)), msg("reject"))
    assert run.message is not None and run.message.reply is not None
    assert run.message.reply.code == 550
    assert run.message.reply.status == "5.7.1"
    assert run.message.reply.lines == ("Rejected by the reference milter (100% sure)",)
    run = await run_session(milter_pipeline(ref(reference)), msg("multiline"))
    assert run.message is not None and run.message.reply is not None
    assert run.message.reply.lines == ("first line", "second line")


async def test_tempfail_discard_and_accept(reference: ReferenceMilter) -> None:
    run = await run_session(milter_pipeline(ref(reference)), msg("tempfail"))
    assert run.message is not None and run.message.reply is not None
    assert run.message.reply.code == 451
    run = await run_session(milter_pipeline(ref(reference)), msg("discard"))
    assert run.message is not None and run.message.reply is None
    assert run.message.discard == "discarded by milter reference"
    run = await run_session(milter_pipeline(ref(reference)), msg("accept, addheader"))
    assert run.message is not None and run.message.reply is None
    assert b"X-Reference: added at the bottom\r\n" in run.message.header


async def test_every_modification(reference: ReferenceMilter) -> None:
    actions = (
        "addheader, insheader, chgheader, delheader, replbody, chgfrom, addrcpt, "
        "addrcpt_par, delrcpt, quarantine"
    )
    run = await run_session(
        milter_pipeline(ref(reference)),
        msg(actions),
        recipients=("alice@example.org", "bob@example.org"),
    )
    v = run.message
    assert v is not None and v.reply is None, run.refused
    assert v.prepend == b"X-Inserted: on top\r\n"
    assert v.header.endswith(b"X-Reference: added at the bottom\r\n")
    assert b"Subject: changed by the milter\r\n" in v.header
    assert b"X-Remove-Me" not in v.header
    assert v.body == b"The body was replaced.\r\n"
    assert v.sender == "new-sender@example.net"
    assert v.added == ["added@example.org", "added2@example.org"]
    assert v.removed == ["bob@example.org"]
    assert v.quarantine == "held by the reference milter"
    # The explain trace says what the milter changed.
    [step] = [s for s in run.trace if s.check == "milter" and s.phase == "end_of_data"]
    assert step.action == "quarantine"
    assert step.saw == (
        "reference: continue (add X-Reference, add X-Inserted, change Subject, "
        "delete X-Remove-Me, new body, sender <new-sender@example.net>, "
        "add recipient <added@example.org>, add recipient <added2@example.org>, "
        "delete recipient <bob@example.org>, quarantine: held by the reference milter)"
    )


async def test_progress_keeps_a_slow_milter_alive(reference: ReferenceMilter) -> None:
    # The milter takes 2 s at end of message but says SMFIR_PROGRESS every 0.5 s:
    # with a 1 s timeout the client must wait for it, not fail it.
    config = MilterConfig(name="reference", address=reference.address, timeout=1)
    run = await run_session(milter_pipeline(config), msg("progress, addheader"))
    assert run.refused == ""
    assert run.message is not None and b"X-Reference" in run.message.header


async def test_rcpt_mail_and_helo_stage_replies(reference: ReferenceMilter) -> None:
    run = await run_session(
        milter_pipeline(ref(reference)),
        msg("none"),
        recipients=("reject-me@example.org", "alice@example.org"),
    )
    assert str(run.rcpts[0].reply) == "550 5.1.1 No such user here"
    assert run.rcpts[1].reply is None
    assert run.message is not None and run.message.reply is None
    run = await run_session(
        milter_pipeline(ref(reference)), msg("none"), sender="tempfail@example.net"
    )
    assert run.mail is not None and run.mail.reply is not None and run.mail.reply.code == 451
    client = ClientFacts(ip="127.0.0.1", port=1, helo="reject.example")
    run = await run_session(milter_pipeline(ref(reference)), msg("none"), client=client)
    assert (
        str(run.helo.reply if run.helo else "") == "550 5.7.1 HELO refused by the reference milter"
    )


async def test_several_milters_in_order(reference: ReferenceMilter) -> None:
    # The second milter sees the first one's header change: both are the same program,
    # so the record of the second shows the Subject the first wrote.
    first = MilterConfig(name="first", address=reference.address, timeout=5)
    second = MilterConfig(name="second", address=reference.address, timeout=5)
    before = len(reference.records())
    run = await run_session(milter_pipeline(first, second), msg("chgheader, addheader"))
    assert run.message is not None and run.message.reply is None
    records = reference.wait_records(before + 2)[-2:]
    subjects = [dict((k, v) for k, v in r["headers"])["Subject"] for r in records]
    assert sorted(subjects) == ["changed by the milter", "hello"]
    assert run.message.header.count(b"X-Reference: added at the bottom") == 2
    # A reject by the first: the second is never asked.
    before = len(reference.records())
    run = await run_session(milter_pipeline(first, second), msg("reject"))
    assert run.message is not None and run.message.reply is not None
    assert len(reference.wait_records(before + 1)) == before + 1


async def test_two_messages_in_one_session(reference: ReferenceMilter) -> None:
    before = len(reference.records())
    run = await run_session(milter_pipeline(ref(reference)), msg("addheader"), messages=2)
    assert run.message is not None and b"X-Reference" in run.message.header
    records = reference.wait_records(before + 2)
    assert [r["macros"]["eom"]["i"] for r in records[-2:]] == ["QTEST0001", "QTEST00011"]


# -- milters that fail ----------------------------------------------------------------
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_milter(behaviour: Behaviour) -> AsyncIterator[str]:
    server = await asyncio.start_server(behaviour, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"inet:127.0.0.1:{port}"
    finally:
        server.close()


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(length)


async def _negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_packet(reader)
    writer.write(struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0))
    await writer.drain()


async def _until_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Negotiate, answer "continue" until MAIL arrives."""
    await _negotiate(reader, writer)
    while True:
        data = await _read_packet(reader)
        if data[:1] == b"M":
            return
        if data[:1] != b"D":
            writer.write(struct.pack(">Ic", 1, b"c"))
            await writer.drain()


async def stall_at_negotiation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    await asyncio.sleep(30)


async def stall_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_mail(reader, writer)
    await asyncio.sleep(30)


async def close_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_mail(reader, writer)
    writer.write(b"\x00\x00")  # half a length, then gone
    writer.close()


async def garbage_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_mail(reader, writer)
    writer.write(b"\x00\x00\x00\x05Zjunk" + b"\xff" * 50)
    await writer.drain()
    await asyncio.sleep(30)


FAILURES: dict[str, Behaviour | None] = {
    "down": None,
    "stall-negotiation": stall_at_negotiation,
    "stall-mail": stall_at_mail,
    "close-mid-dialogue": close_at_mail,
    "garbage": garbage_at_mail,
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize(
    ("default_action", "expected"), [("tempfail", 451), ("reject", 550), ("accept", None)]
)
async def test_failing_milter_gets_the_default_action(
    failure: str, default_action: str, expected: int | None
) -> None:
    behaviour = FAILURES[failure]
    async with contextlib.AsyncExitStack() as stack:
        if behaviour is None:
            address = f"inet:127.0.0.1:{free_port()}"  # nothing listens there
        else:
            address = await stack.enter_async_context(fake_milter(behaviour))
        config = MilterConfig(
            name="broken",
            address=address,
            timeout=0.5,
            default_action=default_action,  # type: ignore[arg-type]
        )
        run = await asyncio.wait_for(run_session(milter_pipeline(config), msg("none")), 20)
    if expected is None:
        assert run.refused == ""
        assert run.message is not None and run.message.reply is None
    else:
        # Refused from MAIL on (never at connect/HELO), with the standard text.
        assert run.connect is not None and run.connect.reply is None
        assert run.helo is not None and run.helo.reply is None
        assert run.mail is not None and run.mail.reply is not None
        assert run.mail.reply.code == expected
    assert any("broken failed" in s.saw for s in run.trace), [s.saw for s in run.trace]


async def test_stall_at_end_of_message_is_a_timeout(reference: ReferenceMilter) -> None:
    config = MilterConfig(name="reference", address=reference.address, timeout=0.5)
    run = await asyncio.wait_for(run_session(milter_pipeline(config), msg("stall")), 20)
    assert run.message is not None and run.message.reply is not None
    assert run.message.reply.code == 451
    assert any("no answer within 0.5 s" in s.saw for s in run.trace)


async def test_a_milter_round_trip_does_not_block_the_event_loop() -> None:
    # While a stalled milter holds one session, the loop keeps running other work.
    async with fake_milter(stall_at_mail) as address:
        config = MilterConfig(name="slow", address=address, timeout=1)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await run_session(milter_pipeline(config), msg("none"))
        task.cancel()
    assert ticks > 20


async def reject_at_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _negotiate(reader, writer)
    while (await _read_packet(reader))[:1] != b"C":
        pass
    text = b"554 5.7.1 You are not welcome here\0"
    writer.write(struct.pack(">Ic", len(text) + 1, b"y") + text)
    await writer.drain()
    await reader.read()


async def accept_at_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _negotiate(reader, writer)
    seen: list[bytes] = []
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            data = await _read_packet(reader)
            seen.append(data[:1])
            if data[:1] == b"C":
                writer.write(struct.pack(">Ic", 1, b"a"))
                await writer.drain()
            if data[:1] == b"Q":
                break
    ACCEPT_SEEN.append(b"".join(seen))


ACCEPT_SEEN: list[bytes] = []


async def test_reject_at_connect_closes_with_the_milters_reply() -> None:
    async with fake_milter(reject_at_connect) as address:
        config = MilterConfig(name="gate", address=address, timeout=2)
        run = await run_session(milter_pipeline(config), msg("none"))
    assert run.connect is not None and run.connect.disconnect
    assert str(run.connect.reply) == "554 5.7.1 You are not welcome here"
    assert run.mail is None


async def test_accept_at_connect_is_not_asked_again() -> None:
    async with fake_milter(accept_at_connect) as address:
        config = MilterConfig(name="gate", address=address, timeout=2)
        run = await run_session(milter_pipeline(config), msg("none"))
        await asyncio.sleep(0.1)
    assert run.refused == ""
    # After the accept, only QUIT was sent: no HELO, MAIL or message.
    assert ACCEPT_SEEN[-1] == b"DCQ"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.binary(min_size=1, max_size=64), stage=st.sampled_from(["negotiate", "mail"]))
async def test_random_bytes_from_a_milter_lead_to_the_default_action(
    junk: bytes, stage: str
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stage == "negotiate":
            await _read_packet(reader)
        else:
            await _until_mail(reader, writer)
        writer.write(junk)
        await writer.drain()
        await asyncio.sleep(5)

    async with fake_milter(behaviour) as address:
        config = MilterConfig(name="junk", address=address, timeout=0.3)
        run = await asyncio.wait_for(run_session(milter_pipeline(config), msg("none")), 20)
    # Either the junk was a valid answer by chance (a continue or a verdict), or the
    # milter failed: then MAIL gets the default tempfail. Never a hang or a crash.
    if any("junk failed" in s.saw for s in run.trace):
        assert run.mail is not None and run.mail.reply is not None
        assert run.mail.reply.code == 451


async def progress_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_mail(reader, writer)
    while True:
        writer.write(struct.pack(">Ic", 1, b"p"))
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_endless_progress_is_still_a_stall() -> None:
    # SMFIR_PROGRESS restarts the timeout, but at most PROGRESS_CEILING times over.
    async with fake_milter(progress_forever) as address:
        config = MilterConfig(name="chatty", address=address, timeout=0.2)
        run = await asyncio.wait_for(run_session(milter_pipeline(config), msg("none")), 20)
    assert run.mail is not None and run.mail.reply is not None
    assert run.mail.reply.code == 451
    assert any("chatty failed (no answer within 0.2 s)" in s.saw for s in run.trace)


async def test_a_replacement_body_over_the_size_limit_is_refused(
    reference: ReferenceMilter,
) -> None:
    # The reference milter's replacement is 24 octets; allow 10.
    run = await run_session(milter_pipeline(ref(reference), message_size=10), msg("replbody"))
    assert run.message is not None and run.message.reply is not None
    assert run.message.reply.code == 451
    assert any("replacement body too large" in s.saw for s in run.trace)
