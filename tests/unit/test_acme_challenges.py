"""The challenge answers: TLS-ALPN-01's certificate (RFC 8737 §3) and the HTTP-01 server
(RFC 8555 §8.3) on a loopback port, asked over a real socket."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import urllib.error
import urllib.request

from cryptography import x509

from postillon.certs.challenges import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    ChallengeBoard,
    Http01Server,
    tls_alpn_certificate,
)
from support.ports import free_port


def test_tls_alpn_certificate_carries_the_key_authorization_digest() -> None:
    cert_pem, _ = tls_alpn_certificate("mx.acme.test", "token.thumbprint")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    digest = hashlib.sha256(b"token.thumbprint").digest()
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x04\x20" + digest  # an OCTET STRING of 32 bytes
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.acme.test"]


def test_board_offers_the_alpn_context_only_while_pending() -> None:
    board = ChallengeBoard()
    assert board.context_for("mx.acme.test") is None
    board.post_tls_alpn01("MX.acme.test", "token.thumbprint")
    ctx = board.context_for("mx.acme.test.")
    assert isinstance(ctx, ssl.SSLContext)
    board.withdraw("mx.acme.test", "token")
    assert board.context_for("mx.acme.test") is None
    assert ACME_TLS_ALPN == "acme-tls/1"


async def test_http01_server_answers_posted_tokens_only() -> None:
    board = ChallengeBoard()
    port = free_port()
    server = Http01Server(f"127.0.0.1:{port}", board)
    await server.bind()
    await server.start()

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    try:
        assert (await asyncio.to_thread(get, "/.well-known/acme-challenge/abc"))[0] == 404
        board.post_http01("abc", "abc.thumb")
        assert await asyncio.to_thread(get, "/.well-known/acme-challenge/abc") == (
            200,
            b"abc.thumb",
        )
        assert (await asyncio.to_thread(get, "/"))[0] == 404
        board.withdraw("mx.acme.test", "abc")
        assert (await asyncio.to_thread(get, "/.well-known/acme-challenge/abc"))[0] == 404
    finally:
        await server.stop()
