"""POST a report to an ``rua=https:`` collector (RFC 8460 §5.2).

``Content-Type: application/tlsrpt+gzip``, the certificate verified (the system CAs,
or ``[tls_reports] ca_file``), no redirects followed, one total timeout. The
collector's name is looked up through postillon's resolver (``[dns] nameservers``),
like every lookup postillon makes, never the machine's own (:func:`_resolver_bridge`).
aiohttp is imported only when there is a report to post: the server does not hold it
otherwise (~7.6 MiB, bench/README.md "Memory").
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.tlsrpt.report import CONTENT_TYPE

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver

__all__ = ["post_report"]


async def post_report(
    url: str, body: bytes, *, resolver: Resolver, timeout: float, ca_file: str | None
) -> tuple[bool, str]:
    """(delivered, what happened) - never raises for the collector's trouble."""
    import aiohttp  # only when there is something to post (see above)

    try:
        context = ssl.create_default_context(cafile=ca_file)
        connector = aiohttp.TCPConnector(resolver=_resolver_bridge(resolver), ssl=context)
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.post(
                url,
                data=body,
                headers={"Content-Type": CONTENT_TYPE},
                allow_redirects=False,  # §5.2 says nothing of redirects; we follow none
            ) as response,
        ):
            await response.read()
            if 200 <= response.status < 300:
                return True, f"HTTP {response.status}"
            return False, f"HTTP {response.status} {response.reason or ''}".rstrip()
    except TimeoutError:
        return False, f"timed out after {timeout:g} s"
    except (aiohttp.ClientError, OSError, ssl.SSLError, ValueError) as exc:
        # A connection error wraps the OSError that says why (our resolver's words too).
        cause = getattr(exc, "os_error", None) or exc
        return False, f"POST failed: {type(exc).__name__}: {cause}"


def _resolver_bridge(resolver: Resolver) -> AbstractResolver:
    """aiohttp's name lookups through postillon's resolver."""
    from aiohttp.abc import AbstractResolver, ResolveResult

    class ResolverBridge(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            try:
                answer = await resolver.addresses(host)
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

    return ResolverBridge()
