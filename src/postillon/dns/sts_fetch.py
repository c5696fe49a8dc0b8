"""Fetching a domain's MTA-STS policy file (RFC 8461 §3.3) over HTTPS.

``https://mta-sts.<domain>/.well-known/mta-sts.txt``, with the rules a sending MTA
applies: the certificate must be valid for ``mta-sts.<domain>`` (the system's CA store,
or ``SSL_CERT_FILE``, or the ``ca_file`` given: ``[outbound] sts_ca_file``), the answer a
200 with ``Content-Type: text/plain``, at most 64 KiB, within a short timeout, and
redirects are not followed (§3.3: "MUST NOT"). The host's address comes from postillon's
resolver (``[dns] nameservers``), like every other lookup.

Two users: ``dnsrecords`` (``postillon dns check``: does the domain's policy work for
senders?) and ``outbound`` (the MTA-STS policy cache). It lives in ``dns`` because it is a
lookup through postillon's resolver that both may import.
"""

from __future__ import annotations

import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from postillon.core.sts import MAX_POLICY_BYTES
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver

TIMEOUT = 10.0


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
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


class ResolverBridge(AbstractResolver):
    """aiohttp's name lookups through postillon's resolver (the MTA-STS fetch and the
    TLS report POST: no HTTPS client of postillon asks the machine's resolver)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            answer = await self._resolver.addresses(host)
        except DnsNotFound as exc:
            raise OSError(f"{host} has no A or AAAA record") from exc
        except DnsTempError as exc:
            raise OSError(f"{host}: DNS lookup failed ({exc})") from exc
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in answer.records
        ]

    async def close(self) -> None:
        return None


async def fetch_policy(
    domain: str, resolver: Resolver, timeout: float = TIMEOUT, *, ca_file: str | None = None
) -> str:
    """The policy file's text; raises :class:`PolicyFetchError`.

    ``ca_file``: trust only the CA certificates in it (tests, private CAs), else the
    system's. ``timeout`` bounds the whole exchange, so a stalling host costs at most that.
    """
    url = policy_url(domain)
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise PolicyFetchError(f"cannot read the CA file {ca_file}: {exc}") from exc
    connector = aiohttp.TCPConnector(resolver=ResolverBridge(resolver), ssl=context)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            return await _policy_text(response)
    except aiohttp.ClientConnectorCertificateError as exc:
        error = exc.certificate_error
        why = getattr(error, "verify_message", None) or str(error)
        raise PolicyFetchError(f"the certificate is not valid ({why})", WEBPKI_INVALID) from exc
    except aiohttp.ClientConnectorError as exc:
        raise PolicyFetchError(f"cannot connect ({exc.os_error})") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PolicyFetchError(str(exc) or type(exc).__name__) from exc


async def _policy_text(response: aiohttp.ClientResponse) -> str:
    if 300 <= response.status < 400:
        raise PolicyFetchError(
            f"HTTP {response.status} redirect to {response.headers.get('Location', '?')}: "
            "senders do not follow redirects (RFC 8461 3.3)"
        )
    if response.status != 200:
        raise PolicyFetchError(f"HTTP {response.status} {response.reason or ''}".rstrip())
    if response.content_type != "text/plain":
        raise PolicyFetchError(
            f"Content-Type is {response.content_type!r}, not text/plain (RFC 8461 3.2)",
            POLICY_INVALID,
        )
    body = await response.content.read(MAX_POLICY_BYTES + 1)
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyFetchError(
            f"the file is larger than {MAX_POLICY_BYTES // 1024} KiB", POLICY_INVALID
        )
    try:
        text: str = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFetchError("the file is not UTF-8 text", POLICY_INVALID) from exc
    return text
