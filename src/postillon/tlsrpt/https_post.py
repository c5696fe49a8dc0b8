"""POST a report to an ``rua=https:`` collector (RFC 8460 §5.2).

``Content-Type: application/tlsrpt+gzip``, the certificate verified (the system CAs,
or ``[tls_reports] ca_file``), no redirects followed, one total timeout. The
collector's name is looked up through postillon's resolver (``[dns] nameservers``),
like every lookup postillon makes, never the machine's own: aiohttp gets the MTA-STS
fetch's bridge (``dns.sts_fetch.ResolverBridge``).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from postillon.dns.resolver import Resolver
from postillon.tlsrpt.report import CONTENT_TYPE

if TYPE_CHECKING:
    pass

__all__ = ["post_report"]


async def post_report(
    url: str, body: bytes, *, resolver: Resolver, timeout: float, ca_file: str | None
) -> tuple[bool, str]:
    """(delivered, what happened) - never raises for the collector's trouble."""
    import aiohttp  # only when there is something to post: it is slow to import

    from postillon.dns.sts_fetch import ResolverBridge

    try:
        context = ssl.create_default_context(cafile=ca_file)
        connector = aiohttp.TCPConnector(resolver=ResolverBridge(resolver), ssl=context)
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
