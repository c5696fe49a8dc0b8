"""Serving this server's own MTA-STS policy over HTTPS (RFC 8461 §3.2, §3.3).

Senders fetch ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` for a domain whose
``_mta-sts`` TXT record they saw. postillon answers that one URL for each of its local
domains, with the mail server's own certificate, so a domain needs no web server for it:

* ``GET``/``HEAD`` of ``/.well-known/mta-sts.txt`` with ``Host: mta-sts.DOMAIN`` (any
  case; without a Host header, the TLS SNI name) for a local DOMAIN: 200, ``Content-Type:
  text/plain``, the text of ``sts_policy.format_policy`` (§3.2).
* Any other method on that URL: 405. Anything else: 404. No redirects (§3.3: senders
  must not follow them), no directory listings, no other files.

Limits, as for every client-controlled resource (DESIGN principle 8): the request line
and header fields are capped (a policy request is one short line and a Host header),
the request body is never read, a connection (TLS handshake included) is closed after
``CONNECTION_SECONDS`` whatever it is doing, and at most ``MAX_CONNECTIONS`` are open.

The socket is bound before the server drops root (port 443 is privileged) and serves once
the rest of the server is up (``bind`` then ``start``, as the SMTP listeners). The TLS
context is this server's own object: a reload loads the new certificate into it
(``reconfigure``), so new handshakes present it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509

from postillon.config.model import split_host_port
from postillon.core.sts import mx_matches

log = logging.getLogger("postillon.mta_sts")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

POLICY_PATH = "/.well-known/mta-sts.txt"
# A policy is fetched once per max_age and id change per sending domain: a few hundred
# connections at once is already an attack, and each costs a TLS handshake.
MAX_CONNECTIONS = 256
# The whole connection, handshake included: far more than a ~100-byte answer needs, and
# a bound on clients that send their request a byte at a time.
CONNECTION_SECONDS = 60.0
TLS_HANDSHAKE_SECONDS = 20.0
# A policy request is "GET /.well-known/mta-sts.txt HTTP/1.1" and a few short headers.
MAX_LINE = 1024
MAX_FIELD = 4096
MAX_HEADERS = 32
# Idle time allowed between requests on one connection.
KEEPALIVE_SECONDS = 5.0


def policy_host(host: str, domains: Iterable[str]) -> str | None:
    """The local domain ``host`` (a Host header or SNI name) asks for: ``mta-sts.`` and
    the domain, any case, an optional port and final dot; None when it names none."""
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal: no domain
        return None
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    prefix = "mta-sts."
    if not name.startswith(prefix):
        return None
    domain = name[len(prefix) :]
    return domain if domain in domains else None


def uncovered_names(certificate: Path, names: Iterable[str]) -> list[str]:
    """The ``names`` the certificate (the first in the PEM file) is not valid for: a
    sender refuses the policy from such a host (RFC 8461 §3.3). Unreadable → all."""
    wanted = list(names)
    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = san.value.get_values_for_type(x509.DNSName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return wanted
    # A certificate's "*.example.org" matches one leftmost label, as an mx pattern does.
    return [n for n in wanted if not any(mx_matches(p, n) for p in dns_names)]


def warn_uncovered(
    certificate: Path, domains: Iterable[str], *, acme_stand_in: bool = False
) -> None:
    """Log each ``mta-sts.DOMAIN`` the certificate does not name: senders would refuse
    the policy (RFC 8461 §3.3), so MTA-STS would quietly not apply to that domain."""
    names = sorted(f"mta-sts.{domain}" for domain in domains)
    if not names:
        log.warning("MTA-STS policy server: no [[domain]] is configured, every request gets 404")
    if acme_stand_in:
        # A self-signed stand-in while the first ACME order runs; that order names every
        # mta-sts.DOMAIN: nothing for the operator to fix.
        if names:
            log.info("MTA-STS: the policy waits for the ACME certificate for %s", ", ".join(names))
        return
    for name in uncovered_names(certificate, names):
        log.warning(
            "MTA-STS: the certificate %s is not valid for %s; senders will not accept the "
            "policy served for it (RFC 8461 3.3): add the name to the certificate",
            certificate,
            name,
        )


class _BoundedServer(web.Server):
    """aiohttp's low-level server, with a cap on connections and on their lifetime
    (the manager hooks every ``RequestHandler`` calls as it connects and goes)."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._deadlines) >= MAX_CONNECTIONS:
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._deadlines[handler] = loop.call_later(CONNECTION_SECONDS, transport.abort)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        deadline = self._deadlines.pop(handler, None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(handler, exc)


class StsServer:
    """``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` for ``domains`` on ``listen``."""

    def __init__(
        self,
        listen: str,
        tls: ssl.SSLContext,
        domains: Iterable[str],
        policy: str,
        challenge: Callable[[str], ssl.SSLContext | None] | None = None,
    ) -> None:
        self.listen = listen
        self.tls = tls
        # SNI name -> the TLS-ALPN-01 answer's context while an ACME challenge for it is
        # pending ([tls] acme): the handshake switches to it (RFC 8737 §3).
        self._challenge = challenge
        self._domains = frozenset(domains)
        self._policy = policy.encode()
        # SNI names by TLS connection, for a request without a Host header (HTTP/1.0).
        self._sni: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
        tls.sni_callback = self._on_sni
        self._web = _BoundedServer(
            self._handle,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            keepalive_timeout=KEEPALIVE_SECONDS,
            lingering_time=1.0,
            access_log=None,
        )
        self._server: asyncio.Server | None = None

    def _on_sni(self, tls: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        if name:
            self._sni[tls] = name
            answer = self._challenge(name) if self._challenge is not None else None
            if answer is not None:
                log.info("ACME: answering the TLS-ALPN-01 challenge for %s", name)
                tls.context = answer

    def reconfigure(self, domains: Iterable[str], policy: str) -> None:
        """A reload's domains and policy text; requests from now on get them. (A new
        certificate is loaded into ``tls`` by the caller, as for the SMTP listeners.)"""
        self._domains = frozenset(domains)
        self._policy = policy.encode()

    async def bind(self) -> None:
        """Bind (port 443 needs root) without serving yet."""
        host, port = split_host_port(self.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._web,
            host or None,
            port,
            ssl=self.tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS,
            reuse_address=True,
            start_serving=False,
        )
        log.info("MTA-STS policy server listening on %s", self.listen)

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._web.shutdown(1.0)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None:
            tls = request.transport.get_extra_info("ssl_object") if request.transport else None
            host = self._sni.get(tls, "") if tls is not None else ""
        domain = policy_host(host, self._domains)
        if domain is None or request.path != POLICY_PATH:
            return _plain(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            response = _plain(405, b"method not allowed\n")
            response.headers["Allow"] = "GET, HEAD"
            return response
        log.debug("MTA-STS policy for %s to %s", domain, request.remote)
        return _plain(200, self._policy)


def _plain(status: int, body: bytes) -> web.Response:
    response = web.Response(status=status, body=body, content_type="text/plain")
    # Nobody needs the software's versions, and the policy is public.
    response.headers["Server"] = "postillon"
    return response
