"""Real filters through the milter check: rspamd (GTUBE rejected with its reply text, a
clean message passes with its X-Spam* headers), OpenDKIM verifying (adds
Authentication-Results: with dkim=pass / dkim=fail, keys from the test's own DNS
server), ClamAV (clamd with an EICAR signature made here, behind clamav-milter: the
EICAR string is rejected). Each runs from a temp dir on loopback (tests/support/milters.py).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postillon.checks.context import ClientFacts
from postillon.checks.milter_check import MilterCheck
from postillon.checks.milter_socket import MilterSocket
from postillon.config.milter import MilterConfig
from postillon.testing.dns_server import DnsServer
from support.milter_pipeline import milter_pipeline, run_session
from support.milters import EICAR, ClamavMilter, OpenDkim, Rspamd

# rspamd's first start compiles its Hyperscan databases (about 25 s here, more on a
# busy machine); later starts reuse them.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLIENT = ClientFacts(
    ip="192.0.2.9", port=5555, helo="client.example.net", listener="smtp:127.0.0.1:25"
)
CLEAN = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <lunch-1@example.net>\r\n"
    b"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b"Shall we have lunch tomorrow?\r\n"
)
GTUBE = CLEAN.replace(
    b"Shall we have lunch tomorrow?",
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    harness = Rspamd()
    try:
        harness.start()
        yield harness
    except BaseException:
        print(harness.log()[-5000:])
        raise
    finally:
        harness.stop()


async def test_rspamd_rejects_gtube_with_its_reply_text(rspamd: Rspamd) -> None:
    config = MilterConfig(name="rspamd", address=rspamd.address, timeout=60)
    run = await run_session(milter_pipeline(config), GTUBE, client=CLIENT)
    assert run.message is not None and run.message.reply is not None, run.trace
    assert str(run.message.reply) == "554 5.7.1 Gtube pattern"
    assert any("rspamd: reject 554 5.7.1 Gtube pattern" in s.saw for s in run.trace)


async def test_rspamd_passes_a_clean_message_with_its_headers(rspamd: Rspamd) -> None:
    config = MilterConfig(name="rspamd", address=rspamd.address, timeout=60)
    run = await run_session(milter_pipeline(config), CLEAN, client=CLIENT, queue_id="QRSPAMD1")
    assert run.refused == ""
    assert run.message is not None
    header = run.message.header
    assert b"\r\nX-Spamd-Result: default: False [" in header
    assert b"\r\nX-Spam-Status: " in header
    assert b"X-Rspamd-Queue-Id: QRSPAMD1\r\n" in header  # the `i` macro reached it
    assert header.startswith(CLEAN.split(b"\r\n\r\n")[0])  # the client's fields untouched


async def test_rspamd_over_one_reused_connection(
    rspamd: Rspamd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rspamd answers a clean message SMFIR_ACCEPT and resets its session on
    SMFIC_QUIT_NC in any state: with ``reuse_connections = "always"`` sessions share
    one connection, and each still gets rspamd's own verdict and headers."""
    opened: list[object] = []
    real = MilterSocket.connection_made

    def counting(self: MilterSocket, transport: asyncio.BaseTransport) -> None:
        opened.append(transport)
        real(self, transport)

    monkeypatch.setattr(MilterSocket, "connection_made", counting)
    config = MilterConfig(
        name="rspamd", address=rspamd.address, timeout=60, reuse_connections="always"
    )
    pipeline = milter_pipeline(config)
    for n, raw in enumerate((CLEAN, GTUBE, CLEAN)):
        run = await run_session(pipeline, raw, client=CLIENT, queue_id=f"QREUSE{n}")
        assert run.message is not None, run.trace
        if raw is GTUBE:
            assert run.message.reply is not None
            assert str(run.message.reply) == "554 5.7.1 Gtube pattern"
        else:
            assert run.refused == ""
            assert f"X-Rspamd-Queue-Id: QREUSE{n}\r\n".encode() in run.message.header
    assert len(opened) == 1
    (check,) = pipeline.checks
    assert isinstance(check, MilterCheck)
    check.pools["rspamd"].close_all()


# -- OpenDKIM ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(public).decode()


@pytest.fixture(scope="module")
def opendkim(dkim_key: tuple[bytes, str]) -> Iterator[OpenDkim]:
    zones = {
        "example.net": {
            "@": {"A": "198.51.100.1"},
            "s1._domainkey.example.net": {"TXT": f'"v=DKIM1; k=rsa; p={dkim_key[1]}"'},
        }
    }
    with DnsServer(zones) as dns:
        harness = OpenDkim(dns.nameserver, authserv_id="mx.example.org")
        try:
            harness.start()
            yield harness
        finally:
            harness.stop()


def signed(pem: bytes) -> bytes:
    signature = dkim.sign(
        CLEAN, b"s1", b"example.net", pem, include_headers=[b"from", b"to", b"subject"]
    )
    return bytes(signature) + CLEAN


async def test_opendkim_verifies_and_adds_authentication_results(
    opendkim: OpenDkim, dkim_key: tuple[bytes, str]
) -> None:
    config = MilterConfig(name="opendkim", address=opendkim.address, timeout=20)
    run = await run_session(milter_pipeline(config), signed(dkim_key[0]), client=CLIENT)
    assert run.refused == ""
    assert run.message is not None
    # SMFIR_INSHEADER at index 0: on top of the message.
    prepend = run.message.prepend.decode()
    assert prepend.startswith("Authentication-Results: mx.example.org;")
    assert "dkim=pass" in prepend and "header.d=example.net" in prepend


async def test_opendkim_reports_a_broken_signature(
    opendkim: OpenDkim, dkim_key: tuple[bytes, str]
) -> None:
    config = MilterConfig(name="opendkim", address=opendkim.address, timeout=20)
    tampered = signed(dkim_key[0]).replace(b"lunch tomorrow", b"dinner tonight")
    run = await run_session(milter_pipeline(config), tampered, client=CLIENT)
    assert run.message is not None and run.message.reply is None
    assert b'dkim=fail reason="signature verification failed"' in run.message.prepend


# -- ClamAV ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clamav() -> Iterator[ClamavMilter]:
    harness = ClamavMilter()
    try:
        harness.start()
        yield harness
    except BaseException:
        print(harness.log()[-5000:])
        raise
    finally:
        harness.stop()


async def test_clamav_rejects_eicar(clamav: ClamavMilter) -> None:
    config = MilterConfig(name="clamav", address=clamav.address, timeout=30)
    virus = CLEAN.replace(b"Shall we have lunch tomorrow?", b"See attached.\r\n" + EICAR)
    run = await run_session(milter_pipeline(config), virus, client=CLIENT)
    assert run.message is not None and run.message.reply is not None
    assert str(run.message.reply) == "550 5.7.1 Virus found: Eicar-Test-Signature.UNOFFICIAL"


async def test_clamav_passes_a_clean_message(clamav: ClamavMilter) -> None:
    config = MilterConfig(name="clamav", address=clamav.address, timeout=30)
    run = await run_session(milter_pipeline(config), CLEAN, client=CLIENT)
    assert run.refused == ""
    assert run.message is not None
    assert b"X-Virus-Status: Clean\r\n" in run.message.header


async def test_three_filters_in_order(
    rspamd: Rspamd, opendkim: OpenDkim, clamav: ClamavMilter, dkim_key: tuple[bytes, str]
) -> None:
    milters = (
        MilterConfig(name="opendkim", address=opendkim.address, timeout=20),
        MilterConfig(name="clamav", address=clamav.address, timeout=30),
        MilterConfig(name="rspamd", address=rspamd.address, timeout=60),
    )
    run = await run_session(milter_pipeline(*milters), signed(dkim_key[0]), client=CLIENT)
    assert run.refused == ""
    assert run.message is not None
    assert b"dkim=pass" in run.message.prepend
    assert b"X-Virus-Status: Clean" in run.message.header
    assert b"X-Spamd-Result" in run.message.header
