"""The MTA-STS policy fetch's own HTTP handling (dns/sts_fetch.py), over real TLS on
loopback port 443: every way an HTTP/1.1 answer may frame its body, the limits, and what
is not a policy file. The integration tests (test_mta_sts.py, test_dns_records_cli.py)
cover the same fetch against http.server through the whole delivery and the CLI."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from postillon.core.sts import MAX_POLICY_BYTES
from postillon.dns.resolver import Answer, DnsNotFound
from postillon.dns.sts_fetch import (
    FETCH_ERROR,
    POLICY_INVALID,
    WEBPKI_INVALID,
    PolicyFetchError,
    fetch_policy,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="port 443 needs root (as in CI)")

DOMAIN = "fetch.test"
HOST = f"mta-sts.{DOMAIN}"
POLICY = "version: STSv1\nmode: enforce\nmx: mx.fetch.test\nmax_age: 86400\n"
SERVER_IP = "127.0.0.61"
CLOSED_IP = "127.0.0.62"  # nothing listens: refused


class Addresses:
    """The slice of a Resolver that the fetch uses."""

    def __init__(self, *ips: str) -> None:
        self.ips = ips

    async def addresses(self, host: str) -> Answer[str]:
        if not self.ips:
            raise DnsNotFound(host, "A", "no address", nxdomain=True)
        return Answer(host, self.ips, 300, host)


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@asynccontextmanager
async def policy_host(ca: trustme.CA, answer: bytes, name: str = HOST) -> AsyncIterator[None]:
    """Serves ``answer`` (status line, header, body: raw bytes) to each request, then closes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)

    async def answer_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer_one, SERVER_IP, 443, ssl=context)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def fetched(ca: trustme.CA, ca_file: str, answer: bytes, **kw: object) -> str:
    async with policy_host(ca, answer, **kw):  # type: ignore[arg-type]
        return await fetch_policy(DOMAIN, Addresses(SERVER_IP), 5.0, ca_file=ca_file)  # type: ignore[arg-type]


async def failure(ca: trustme.CA, ca_file: str, answer: bytes, **kw: object) -> PolicyFetchError:
    with pytest.raises(PolicyFetchError) as caught:
        await fetched(ca, ca_file, answer, **kw)
    return caught.value


TEXT = "Content-Type: text/plain"


@pytest.mark.parametrize(
    "answer",
    [
        head("HTTP/1.1 200 OK", TEXT, f"Content-Length: {len(POLICY)}") + POLICY.encode(),
        head("HTTP/1.1 200 OK", "Content-Type: text/plain; charset=utf-8", "Connection: close")
        + POLICY.encode(),  # no length: the body ends with the connection
        head("HTTP/1.1 200 OK", TEXT, "Transfer-Encoding: chunked") + chunked(POLICY.encode(), 7),
        head("HTTP/1.0 200 OK", "content-type: TEXT/PLAIN") + POLICY.encode(),
    ],
    ids=["content-length", "until-close", "chunked", "http-1.0"],
)
async def test_each_framing_gives_the_file(ca: trustme.CA, ca_file: str, answer: bytes) -> None:
    assert await fetched(ca, ca_file, answer) == POLICY


async def test_a_refused_address_is_skipped(ca: trustme.CA, ca_file: str) -> None:
    answer = head("HTTP/1.1 200 OK", TEXT, f"Content-Length: {len(POLICY)}") + POLICY.encode()
    async with policy_host(ca, answer):
        resolver = Addresses(CLOSED_IP, SERVER_IP)
        text = await fetch_policy(DOMAIN, resolver, 5.0, ca_file=ca_file)  # type: ignore[arg-type]
    assert text == POLICY


big = b"x" * (MAX_POLICY_BYTES + 1)
OK = "HTTP/1.1 200 OK"
INVALID = POLICY_INVALID
OVER = "larger than 64 KiB"
CUT_CHUNKED = head(OK, TEXT, "Transfer-Encoding: chunked") + b"zz\r\n"


@pytest.mark.parametrize(
    ("answer", "result_type", "words"),
    [
        (head(OK, TEXT, f"Content-Length: {len(big)}") + big, INVALID, OVER),
        (head(OK, TEXT, "Transfer-Encoding: chunked") + chunked(big, 4096), INVALID, OVER),
        (head(OK, TEXT) + big, INVALID, OVER),
        (head(OK, "Content-Length: 4") + b"abcd", INVALID, "'application/octet-stream', not"),
        (head(OK, TEXT, "Content-Length: 2") + b"\xff\xfe", INVALID, "not UTF-8"),
        (head("HTTP/1.1 302 Found", "Location: https://x.test/"), FETCH_ERROR, "302 redirect to"),
        (head("HTTP/1.1 404 Not Found", "Content-Length: 0"), FETCH_ERROR, "HTTP 404 Not Found"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", FETCH_ERROR, "not HTTP"),
        (b"HTTP/1.1 200 OK\r\n", FETCH_ERROR, "ended before an HTTP answer"),
        (head(OK, TEXT, "Content-Length: 99") + b"short", FETCH_ERROR, "ended in the middle"),
        (CUT_CHUNKED, FETCH_ERROR, "malformed"),
    ],
    ids=["length-over", "chunked-over", "close-over", "no-type", "latin1", "redirect", "404",
         "not-http", "cut-header", "cut-body", "bad-chunk"],
)  # fmt: skip
async def test_what_is_not_a_policy_file_says_why(
    ca: trustme.CA, ca_file: str, answer: bytes, result_type: str, words: str
) -> None:
    error = await failure(ca, ca_file, answer)
    assert words in str(error) and error.result_type == result_type


async def test_a_certificate_for_another_name_is_webpki_invalid(
    ca: trustme.CA, ca_file: str
) -> None:
    answer = head("HTTP/1.1 200 OK", TEXT, f"Content-Length: {len(POLICY)}") + POLICY.encode()
    error = await failure(ca, ca_file, answer, name="mta-sts.other.test")
    assert error.result_type == WEBPKI_INVALID and "certificate is not valid" in str(error)


async def test_no_address_and_nothing_listening_cannot_connect(ca_file: str) -> None:
    for resolver in (Addresses(), Addresses(CLOSED_IP)):
        with pytest.raises(PolicyFetchError, match="cannot connect") as caught:
            await fetch_policy(DOMAIN, resolver, 5.0, ca_file=ca_file)  # type: ignore[arg-type]
        assert caught.value.result_type == FETCH_ERROR


async def test_a_stalling_host_costs_the_timeout(ca: trustme.CA, ca_file: str) -> None:
    stalled = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    server = await asyncio.start_server(never_answer, SERVER_IP, 443, ssl=context)
    try:
        with pytest.raises(PolicyFetchError, match=r"no answer within 0\.2 s"):
            await fetch_policy(DOMAIN, Addresses(SERVER_IP), 0.2, ca_file=ca_file)  # type: ignore[arg-type]
    finally:
        stalled.set()
        server.close()
        await server.wait_closed()
