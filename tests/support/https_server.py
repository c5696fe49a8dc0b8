"""A small HTTPS server for tests, on a loopback address, with its own test CA.

It serves one programmable answer per path (status, headers, body), over real TLS with
a certificate for the names given, issued by a CA made for the run: a client trusts it
through ``SSL_CERT_FILE`` (``ca_file``) and nothing else on the machine does. Used for the
MTA-STS policy file (``https://mta-sts.<domain>/.well-known/mta-sts.txt``), which must be
on port 443: binding it needs root, as CI has. It also takes POSTs (``posts``: path,
headers, body), as a TLS report collector (RFC 8460 §5.2) does; ``Answer.delay`` makes
it stall before answering.
"""

from __future__ import annotations

import datetime
import http.server
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/plain"})
    delay: float = 0.0  # seconds to stall before answering


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_files(directory: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) PEM files; the server
    certificate is valid for ``names`` for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("postillon test CA"))
        .issuer_name(_name("postillon test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class HttpsServer:
    """``with HttpsServer(dir, "127.0.0.80", ["mta-sts.example.org"]) as web:``;
    ``web.answers[path] = Answer(...)``; ``web.ca_file`` for the client's trust."""

    def __init__(self, directory: Path, address: str, names: list[str], port: int = 443):
        self.ca_file, cert, key = make_tls_files(directory, names)
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        self.posts: list[tuple[str, dict[str, str], bytes]] = []  # (path, headers, body)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = self.headers.get("Host", "")
                outer.requests.append((host, self.path))
                # "host/path" answers one host name only; "/path" every name.
                named = outer.answers.get(host.rpartition(":")[0] or host + self.path)
                answer = named or outer.answers.get(self.path, Answer(404, b"not found\n"))
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.posts.append((self.path, dict(self.headers.items()), body))
                answer = outer.answers.get(self.path, Answer(404, b"not found\n"))
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer((address, port), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HttpsServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
