"""MTA-STS end to end: real DNS, a real HTTPS policy host, real STARTTLS receivers.

::

    SmtpTransport --DnsResolver--> DnsServer 127.0.0.1 (MX, A, _mta-sts TXT)
         |  StsPolicies --HTTPS (sts_ca_file)--> 127.0.0.80:443 mta-sts.<domain>
         |                                       (HttpsServer: one answer per path)
         +--STARTTLS--> 127.0.0.2:25 mx-bad.sts.test    valid certificate, not in the policies
         +--STARTTLS--> 127.0.0.3:25 mx-good.sts.test   valid certificate, listed
         +--STARTTLS--> 127.0.0.4:25 mx-wrong.sts.test  listed, certificate for another name
         +------------> 127.0.0.5:25 mx-plain.sts.test  listed, no STARTTLS

The receivers' certificates and the policy host's come from two test CAs, both in the
``sts_ca_file`` bundle (and nothing else is trusted). The policy cache is a real SQLite
queue store. Needs root (ports 25 and 443) inside scripts/run-tests.sh's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, Outcome, TempFail
from postillon.delivery.transport import DeliveryJob
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.outbound.client_session import ClientTimeouts
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.outbound.sts_policies import StsPolicies
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import Route
from postillon.testing.dns_server import DnsServer
from support.https_server import Answer, HttpsServer
from support.starttls_receiver import StartTlsReceiver

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="binds 127.0.0.x:25 and :443 (root)"),
]

IPS = {
    "mx-bad.sts.test": "127.0.0.2",
    "mx-good.sts.test": "127.0.0.3",
    "mx-wrong.sts.test": "127.0.0.4",
    "mx-plain.sts.test": "127.0.0.5",
}
WEB_IP = "127.0.0.80"
STALL_IP = "127.0.0.81"
PATH = "/.well-known/mta-sts.txt"
# Recipient domain -> its MX hosts (preference order).
DOMAINS = {
    "enforce.test": ["mx-bad.sts.test", "mx-good.sts.test"],
    "nomatch.test": ["mx-bad.sts.test"],
    "badcert.test": ["mx-wrong.sts.test"],
    "plain.test": ["mx-plain.sts.test"],
    "stall.test": ["mx-bad.sts.test"],
}


def policy(mode: str, *mx: str, max_age: int = 86400) -> Answer:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return Answer(body=("\r\n".join(lines) + "\r\n").encode())


def zones(ids: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {
        "sts.test": {host: {"A": ip} for host, ip in IPS.items()},
    }
    for domain, hosts in DOMAINS.items():
        names: dict[str, object] = {
            "@": {"MX": [f"{10 * (i + 1)} {h}" for i, h in enumerate(hosts)]},
            f"mta-sts.{domain}": {"A": STALL_IP if domain == "stall.test" else WEB_IP},
        }
        if domain in ids:
            names[f"_mta-sts.{domain}"] = {"TXT": f'"v=STSv1; id={ids[domain]}"'}
        out[domain] = names
    return out


@dataclass
class World:
    dns: DnsServer
    web: HttpsServer
    ca: trustme.CA
    bundle: Path
    store_path: Path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ca = trustme.CA()
    web_names = [f"mta-sts.{d}" for d in DOMAINS]
    ids = {d: "one" for d in DOMAINS}
    with (
        DnsServer(zones(ids), default_ttl=0) as dns_server,
        HttpsServer(tmp_path / "web", WEB_IP, web_names) as web,
    ):
        bundle = tmp_path / "sts-ca.pem"
        bundle.write_bytes(web.ca_file.read_bytes() + ca.cert_pem.bytes())
        yield World(dns_server, web, ca, bundle, tmp_path / "queue.db")


@asynccontextmanager
async def receivers(world: World) -> AsyncIterator[dict[str, StartTlsReceiver]]:
    async with AsyncExitStack() as stack:
        out = {}
        for host, ip in IPS.items():
            ctx: ssl.SSLContext | None = None
            if host != "mx-plain.sts.test":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                name = "someone-else.example" if host == "mx-wrong.sts.test" else host
                world.ca.issue_cert(name).configure_cert(ctx)
            out[host] = await stack.enter_async_context(StartTlsReceiver(ip, 25, host, ctx))
        yield out


def job(domain: str) -> DeliveryJob:
    info = MessageInfo("Q1", "a@s.test", MailParams(), 10, 0.0, "", "", ())
    record = DeliveryRecord(
        1, "Q1", f"rcpt@{domain}", None, RcptParams(), DeliveryState.LEASED, 0, 0.0, None,
        "tok", "me", 0.0, 0.0,
    )  # fmt: skip
    route = Route("smtp", f"smtp:{domain}", domain)
    return DeliveryJob(info, (record,), route, store=None, cached_body=b"Subject: t\r\n\r\nhi\r\n")  # type: ignore[arg-type]


async def deliver(world: World, *domains: str, fetch_timeout: float = 5.0) -> list[Outcome]:
    """One transport (as one server process): its own resolver, the store on disk."""
    resolver = DnsResolver([world.dns.nameserver], timeout=2.0, attempts=1)
    store = SqliteStore(world.store_path)
    sts = StsPolicies(resolver, store, ca_file=str(world.bundle), fetch_timeout=fetch_timeout)
    settings = OutboundSettings(
        helo_name="client.test", timeouts=ClientTimeouts(connect=5, greeting=5, command=5)
    )
    t = SmtpTransport(resolver, settings, mta_sts=sts)
    try:
        outcomes: list[Outcome] = []
        for domain in domains:
            outcomes += await t.deliver(job(domain))
        return outcomes
    finally:
        await t.close()
        await store.close()


def only(outcomes: Sequence[Outcome]) -> Outcome:
    [outcome] = outcomes
    return outcome


async def test_enforce_skips_the_unlisted_mx_and_delivers_to_the_listed(world: World) -> None:
    world.web.answers[PATH] = policy("enforce", "mx-good.sts.test")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "enforce.test"))
    assert isinstance(outcome, Delivered), outcome
    assert "mx-good.sts.test" in outcome.detail and "mta-sts=enforce" in outcome.detail
    assert "tls=TLSv1.3/verified" in outcome.detail
    assert rx["mx-bad.sts.test"].connections == 0  # refused before connecting (§4.1)
    assert [m.tls for m in rx["mx-good.sts.test"].messages] == [True]
    assert world.web.requests == [("mta-sts.enforce.test", PATH)]


async def test_enforce_with_no_listed_mx_defers_with_the_reason(world: World) -> None:
    world.web.answers[PATH] = policy("enforce", "*.elsewhere.test")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "nomatch.test"))
    assert isinstance(outcome, TempFail), outcome
    assert outcome.reply.code == 451 and outcome.reply.status == "4.7.5"
    assert "MTA-STS: mx-bad.sts.test does not match the policy of nomatch.test" in str(
        outcome.reply
    )
    assert rx["mx-bad.sts.test"].connections == 0


async def test_enforce_with_a_wrong_name_certificate_defers(world: World) -> None:
    world.web.answers[PATH] = policy("enforce", "mx-wrong.sts.test")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "badcert.test"))
    assert isinstance(outcome, TempFail), outcome
    assert "MTA-STS: certificate not valid for mx-wrong.sts.test" in str(outcome.reply)
    wrong = rx["mx-wrong.sts.test"]
    assert wrong.handshakes == 1 and wrong.messages == []  # TLS came up, then no MAIL


async def test_enforce_never_delivers_in_clear(world: World) -> None:
    world.web.answers[PATH] = policy("enforce", "mx-plain.sts.test")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "plain.test"))
    assert isinstance(outcome, TempFail), outcome
    assert "STARTTLS" in str(outcome.reply) or "STARTTLS" in outcome.detail
    assert rx["mx-plain.sts.test"].messages == []


async def test_testing_mode_delivers_and_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.web.answers[PATH] = policy("testing", "mx-wrong.sts.test")
    caplog.set_level(logging.WARNING, "postillon.outbound")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "badcert.test"))
    assert isinstance(outcome, Delivered), outcome
    assert len(rx["mx-wrong.sts.test"].messages) == 1
    assert "MTA-STS: certificate not valid for mx-wrong.sts.test" in caplog.text
    assert "testing: delivering anyway" in caplog.text


async def test_changed_id_fetches_the_new_policy(world: World) -> None:
    world.web.answers[PATH] = policy("testing", "mx-bad.sts.test")
    async with receivers(world) as rx:
        assert isinstance(only(await deliver(world, "nomatch.test")), Delivered)
        # Same id: the cached policy, no fetch (even though the file changed).
        world.web.answers[PATH] = policy("enforce", "mx-good.sts.test")
        assert isinstance(only(await deliver(world, "nomatch.test")), Delivered)
        assert len(world.web.requests) == 1
        world.dns.set_records("_mta-sts.nomatch.test", "TXT", '"v=STSv1; id=two"')
        outcome = only(await deliver(world, "nomatch.test"))
    assert len(world.web.requests) == 2
    assert isinstance(outcome, TempFail) and "does not match the policy" in str(outcome.reply)
    assert len(rx["mx-bad.sts.test"].messages) == 2


async def test_cached_policy_survives_restart_and_unreachable_host(world: World) -> None:
    """RFC 8461 §5.1: the policy host is gone and the id changed; the cached (unexpired)
    enforce policy, read from the store by a new process, still applies."""
    world.web.answers[PATH] = policy("enforce", "mx-good.sts.test")
    async with receivers(world):
        assert isinstance(only(await deliver(world, "enforce.test")), Delivered)
    world.web.__exit__(None, None, None)  # the policy host is unreachable from now on
    world.dns.set_records("_mta-sts.enforce.test", "TXT", '"v=STSv1; id=two"')
    world.dns.set_records("enforce.test", "MX", ["10 mx-bad.sts.test"])
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "enforce.test"))
    assert isinstance(outcome, TempFail), outcome
    assert "does not match the policy of enforce.test" in str(outcome.reply)
    assert rx["mx-bad.sts.test"].connections == 0
    store = SqliteStore(world.store_path)
    try:
        [cached] = await store.sts_policies()
    finally:
        await store.close()
    assert cached.policy_id == "one" and "cannot connect" in cached.last_error


@pytest.mark.parametrize(
    "answer",
    [
        Answer(301, headers={"Location": "https://www.enforce.test/sts.txt"}),
        Answer(headers={"Content-Type": "text/html"}, body=b"<html>mode: enforce</html>"),
        Answer(body=b"version: STSv1\nmode: enforce\nmx: mx-good.sts.test\nmax_age: 1\n" * 2000),
        Answer(body=b"version: STSv1\nmode: sometimes\n"),
        Answer(500, body=b"oops"),
    ],
    ids=["redirect", "html", "oversized", "malformed", "http-500"],
)
async def test_broken_policy_means_no_policy(
    world: World, answer: Answer, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 8461 §3.3: no valid policy and none cached - deliver as without MTA-STS (to
    the first MX, which the broken policy would not have listed), and say why."""
    world.web.answers[PATH] = answer
    caplog.set_level(logging.WARNING, "postillon.outbound")
    async with receivers(world) as rx:
        outcome = only(await deliver(world, "enforce.test"))
    assert isinstance(outcome, Delivered), outcome
    assert "mx-bad.sts.test" in outcome.detail and "mta-sts" not in outcome.detail
    assert len(rx["mx-bad.sts.test"].messages) == 1
    assert "fetching the policy of enforce.test failed" in caplog.text
    assert "no MTA-STS policy applies" in caplog.text


async def test_stalling_policy_host_costs_one_timeout(world: World) -> None:
    """A host that accepts and never answers: the fetch times out, delivery goes on."""
    listener = socket.socket()
    listener.bind((STALL_IP, 443))
    listener.listen(8)
    try:
        async with receivers(world) as rx:
            started = asyncio.get_running_loop().time()
            outcomes = await deliver(world, "stall.test", "stall.test", fetch_timeout=1.0)
            took = asyncio.get_running_loop().time() - started
    finally:
        listener.close()
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert len(rx["mx-bad.sts.test"].messages) == 2
    assert took < 4.0  # one timeout, not one per message
