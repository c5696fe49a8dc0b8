"""Answering the CA's challenges: TLS-ALPN-01 (RFC 8737) and HTTP-01 (RFC 8555 §8.3).

The ACME client (in a worker thread) posts what a challenge needs here before it tells
the CA to validate, and takes it back afterwards; the listeners (on the event loop) read
it. A dict under a lock is the whole hand-over.

TLS-ALPN-01: the CA connects to port 443 with SNI = the name and ALPN ``acme-tls/1`` and
expects a self-signed certificate for that name holding the critical ``acmeIdentifier``
extension (the SHA-256 of the key authorization). The MTA-STS server's SNI callback asks
``context_for(name)``: while a challenge for the name is pending the handshake switches
to a context holding that certificate (and offering only ``acme-tls/1``). A browser that
asks for ``mta-sts.DOMAIN`` in those few seconds would see it too; senders retry.

HTTP-01: ``GET /.well-known/acme-challenge/TOKEN`` on port 80 answers the key
authorization as text; anything else is 404.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from postillon.config.model import split_host_port

log = logging.getLogger("postillon.acme")

ACME_TLS_ALPN = "acme-tls/1"  # RFC 8737 §6.2
# id-pe-acmeIdentifier (RFC 8737 §6.1).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HTTP01_PREFIX = "/.well-known/acme-challenge/"
# The CA connects a few times per order; anything more is noise or an attack.
MAX_CONNECTIONS = 64
CONNECTION_SECONDS = 30.0


def tls_alpn_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of the TLS-ALPN-01 answer for ``name`` (RFC 8737 §3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # The extension's value is an ASN.1 OCTET STRING holding the 32-byte digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _alpn_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # ssl loads certificates from files only: a private temporary directory, gone at once.
    with tempfile.TemporaryDirectory(prefix="postillon-acme-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        key_file.touch(0o600)
        key_file.write_bytes(key_pem)
        cert_file.write_bytes(cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class ChallengeBoard:
    """The challenges pending right now, posted by the ACME thread, read by the listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: dict[str, str] = {}  # token -> key authorization
        self._alpn: dict[str, ssl.SSLContext] = {}  # name -> context presenting the answer

    def post_http01(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._http[token] = key_authorization

    def post_tls_alpn01(self, name: str, key_authorization: str) -> None:
        context = _alpn_context(*tls_alpn_certificate(name, key_authorization))
        with self._lock:
            self._alpn[name.lower()] = context

    def withdraw(self, name: str, token: str) -> None:
        with self._lock:
            self._http.pop(token, None)
            self._alpn.pop(name.lower(), None)

    def http01(self, token: str) -> str | None:
        with self._lock:
            return self._http.get(token)

    def context_for(self, name: str) -> ssl.SSLContext | None:
        """The TLS-ALPN-01 context for an SNI name, while its challenge is pending."""
        with self._lock:
            return self._alpn.get(name.lower().rstrip("."))


def _bounded_server_class() -> type[Any]:
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    class BoundedServer(web.Server):
        """aiohttp's low-level server with a cap on connections and their lifetime."""

        def __init__(self, handler: Any, **kwargs: Any) -> None:
            super().__init__(handler, **kwargs)
            self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}

        def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
            super().connection_made(handler, transport)
            if len(self._deadlines) >= MAX_CONNECTIONS:
                transport.abort()
                return
            loop = asyncio.get_running_loop()
            self._deadlines[handler] = loop.call_later(CONNECTION_SECONDS, transport.abort)

        def connection_lost(
            self, handler: RequestHandler, exc: BaseException | None = None
        ) -> None:
            deadline = self._deadlines.pop(handler, None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(handler, exc)

    return BoundedServer


class Http01Server:
    """The HTTP-01 responder on ``[tls] acme_http_listen`` (port 80: bound as root)."""

    def __init__(self, listen: str, board: ChallengeBoard) -> None:
        self.listen = listen
        self._board = board
        self._server: asyncio.Server | None = None
        self._web: object | None = None

    async def bind(self) -> None:
        from aiohttp import web  # slow to import; only a server with ACME needs it

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            answer = None
            if request.method in ("GET", "HEAD") and request.path.startswith(HTTP01_PREFIX):
                answer = self._board.http01(request.path[len(HTTP01_PREFIX) :])
            if answer is None:
                return web.Response(status=404, text="not found\n")
            log.info("ACME: answered the HTTP-01 challenge for %s", request.host)
            return web.Response(text=answer, content_type="text/plain")

        # Limits, as on every socket a client controls (DESIGN principle 8): short
        # request lines and headers, no body read, idle connections closed after 5 s,
        # every connection after CONNECTION_SECONDS, at most MAX_CONNECTIONS at once.
        server = _bounded_server_class()(
            handle,
            access_log=None,
            max_line_size=1024,
            max_field_size=4096,
            max_headers=32,
            keepalive_timeout=5.0,
            lingering_time=1.0,
        )
        self._web = server
        host, port = split_host_port(self.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            server, host or None, port, reuse_address=True, start_serving=False
        )
        log.info("ACME HTTP-01 challenge server listening on %s", self.listen)

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
