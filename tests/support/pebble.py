"""Pebble, Let's Encrypt's ACME test server (Debian ``pebble``), run from a temp dir.

``Pebble(root, dns="127.0.0.1:PORT", http_port=..., tls_port=...)`` writes its config
(the ACME directory on a free loopback port, served with a certificate from a trustme CA
the test trusts through ``ca_file``; the management API beside it), starts it in its own
process group with ``-dnsserver`` pointed at the test's loopback DNS server, and waits
until it answers. Pebble validates challenges by resolving the name there and connecting
to ``http_port`` (HTTP-01) or ``tls_port`` (TLS-ALPN-01) on the address it got.

The environment makes it deterministic: no artificial validation sleeps
(``PEBBLE_VA_NOSLEEP``), no deliberately rejected nonces (``PEBBLE_WFE_NONCEREJECT=0``),
and no reused authorizations (``PEBBLE_AUTHZREUSE=0``: every order is validated again,
so a test can make a renewal's challenge fail). ``root_pem()`` is the root its
certificates chain to (``/roots/0`` on the management port), for the test's trust.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from support.ports import free_port, stop_process, wait_until

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


@dataclass
class Pebble:
    root: Path
    dns: str  # "127.0.0.1:PORT" of the loopback DNS server
    http_port: int
    tls_port: int
    port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def ca_file(self) -> Path:
        """The CA of the directory's HTTPS certificate (``[tls] acme_ca_file``)."""
        return self.root / "pebble-https-ca.pem"

    def start(self) -> Pebble:
        if not os.access(PEBBLE, os.X_OK):
            raise RuntimeError("pebble is missing: run scripts/install-system-deps.sh as root")
        self.root.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(self.root / "https-cert.pem"))
        leaf.private_key_pem.write_to_path(str(self.root / "https-key.pem"))
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.root / "https-cert.pem"),
                "privateKey": str(self.root / "https-key.pem"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.root / "pebble.json").write_text(json.dumps(config))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(self.root / "pebble.json"), "-dnsserver", self.dns],
            stdout=open(self.root / "pebble.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_until(self._answers, timeout=20.0, what="pebble's ACME directory")
        return self

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"pebble exited:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.directory, context=self._context(), timeout=2):
                return True
        except OSError:
            return False

    def root_pem(self) -> bytes:
        """The root CA of the certificates Pebble issues (new at every Pebble start)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=5) as response:
            data: bytes = response.read()
        return data

    def log(self) -> str:
        try:
            return (self.root / "pebble.log").read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
