"""Fetching a domain's MTA-STS policy file (RFC 8461 §3.3) over HTTPS.

``https://mta-sts.<domain>/.well-known/mta-sts.txt``, with the rules a sending MTA
applies: the certificate must be valid for ``mta-sts.<domain>`` (the system's CA store,
or ``SSL_CERT_FILE``, or the ``ca_file`` given: ``[outbound] sts_ca_file``), the answer a
200 with ``Content-Type: text/plain``, at most 64 KiB, within a short timeout, and
redirects are not followed (§3.3: "MUST NOT"). The host's address comes from postillon's
resolver (``[dns] nameservers``), like every other lookup.

One GET of a small file over asyncio's own TLS streams, the header parsed by the standard
library's ``http.client.parse_headers``: an HTTP client library would cost the server
~7.6 MiB (aiohttp and its dependencies, bench/README.md "Memory") for this one request.

Two users: ``dnsrecords`` (``postillon dns check``: does the domain's policy work for
senders?) and ``outbound`` (the MTA-STS policy cache). It lives in ``dns`` because it is a
lookup through postillon's resolver that both may import.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import ssl

from postillon.core.sts import MAX_POLICY_BYTES
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver

TIMEOUT = 10.0
POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_HEADER_BYTES = 16 * 1024


# RFC 8460 §4.3.2.2: which TLS report result type a failed fetch is.
FETCH_ERROR = "sts-policy-fetch-error"  # unreachable, timeout, HTTP error, redirect
WEBPKI_INVALID = "sts-webpki-invalid"  # the policy host's certificate did not verify
POLICY_INVALID = "sts-policy-invalid"  # fetched, but not a valid policy file


class PolicyFetchError(Exception):
    """The policy file could not be fetched; ``str()`` says why, ``result_type`` which
    RFC 8460 result type it is (one of the three above)."""

    def __init__(self, message: str, result_type: str = FETCH_ERROR) -> None:
        super().__init__(message)
        self.result_type = result_type


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}{POLICY_PATH}"


async def fetch_policy(
    domain: str, resolver: Resolver, timeout: float = TIMEOUT, *, ca_file: str | None = None
) -> str:
    """The policy file's text; raises :class:`PolicyFetchError`.

    ``ca_file``: trust only the CA certificates in it (tests, private CAs), else the
    system's. ``timeout`` bounds the whole exchange, so a stalling host costs at most that.
    """
    host = f"mta-sts.{domain}"
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise PolicyFetchError(f"cannot read the CA file {ca_file}: {exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(host, resolver, context)
            try:
                return await _exchange(host, reader, writer)
            finally:
                writer.close()
    except TimeoutError as exc:
        raise PolicyFetchError(f"no answer within {timeout:g} s") from exc


async def _connect(
    host: str, resolver: Resolver, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the first of ``host``'s addresses that takes one."""
    try:
        answer = await resolver.addresses(host)
    except DnsNotFound as exc:
        raise PolicyFetchError(f"cannot connect ({host} has no A or AAAA record)") from exc
    except DnsTempError as exc:
        raise PolicyFetchError(f"cannot connect ({host}: DNS lookup failed ({exc}))") from exc
    errors: list[str] = []
    for address in answer.records:
        try:
            return await asyncio.open_connection(
                address, 443, ssl=context, server_hostname=host, limit=MAX_HEADER_BYTES
            )
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or str(exc)
            raise PolicyFetchError(f"the certificate is not valid ({why})", WEBPKI_INVALID) from exc
        except OSError as exc:  # refused, unreachable, a TLS handshake that failed
            errors.append(f"{address}: {exc.strerror or exc}")
    raise PolicyFetchError(f"cannot connect ({'; '.join(errors) or 'no address'})")


async def _exchange(host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    request = (
        f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: postillon\r\n"
        "Accept: text/plain\r\nConnection: close\r\n\r\n"
    )
    try:
        writer.write(request.encode("ascii"))
        head = await reader.readuntil(b"\r\n\r\n")
    except UnicodeEncodeError as exc:
        raise PolicyFetchError(f"{host!r} is not an ASCII host name") from exc
    except asyncio.LimitOverrunError as exc:
        raise PolicyFetchError(
            f"the HTTP header is longer than {MAX_HEADER_BYTES // 1024} KiB"
        ) from exc
    except (asyncio.IncompleteReadError, OSError) as exc:
        raise PolicyFetchError("the connection ended before an HTTP answer") from exc
    status_line, _, header_block = head.partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code, _, reason_bytes = rest.partition(b" ")
    if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
        raise PolicyFetchError("the answer is not HTTP")
    status, reason = int(code), reason_bytes.decode("latin-1").strip()
    headers = http.client.parse_headers(io.BytesIO(header_block))
    if 300 <= status < 400:
        raise PolicyFetchError(
            f"HTTP {status} redirect to {headers.get('Location', '?')}: "
            "senders do not follow redirects (RFC 8461 3.3)"
        )
    if status != 200:
        raise PolicyFetchError(f"HTTP {status} {reason}".rstrip())
    raw_type = headers.get("Content-Type")
    content_type = raw_type.split(";")[0].strip().lower() if raw_type else ""
    if content_type != "text/plain":
        shown = content_type or "application/octet-stream"  # no Content-Type: RFC 9110 8.3
        raise PolicyFetchError(
            f"Content-Type is {shown!r}, not text/plain (RFC 8461 3.2)", POLICY_INVALID
        )
    try:
        body = await _body(reader, headers)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        raise PolicyFetchError("the connection ended in the middle of the file") from exc
    except ValueError as exc:
        raise PolicyFetchError(f"malformed HTTP body framing ({exc})") from exc
    try:
        text: str = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFetchError("the file is not UTF-8 text", POLICY_INVALID) from exc
    return text


def _too_large() -> PolicyFetchError:
    return PolicyFetchError(
        f"the file is larger than {MAX_POLICY_BYTES // 1024} KiB", POLICY_INVALID
    )


async def _body(reader: asyncio.StreamReader, headers: http.client.HTTPMessage) -> bytes:
    """The body, framed by chunked encoding, Content-Length or the end of the connection;
    at most ``MAX_POLICY_BYTES``. Raises ValueError for framing that does not parse."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                return bytes(body)
            if len(body) + size > MAX_POLICY_BYTES:
                raise _too_large()
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
    length = headers.get("Content-Length")
    if length is not None:
        if int(length) > MAX_POLICY_BYTES:
            raise _too_large()
        return await reader.readexactly(int(length))
    body = bytearray()
    while chunk := await reader.read(MAX_POLICY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise _too_large()
    return bytes(body)
