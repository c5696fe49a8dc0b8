"""SCRAM-SHA-256 verifiers in the accounts file (issue 18, item 5).

postillon user add ──▶ accounts.json (scrypt + SCRAM verifier with its iteration count)
smtplib SCRAM client ──STARTTLS──▶ postillon serve (submission) ──▶ 235

A verifier of 4,096 PBKDF2 iterations beside the scrypt hash made a leaked
file as weak as the cheaper of the two: new verifiers get far more, and an
account made before keeps logging in with the count stored beside it.
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import subprocess

import pytest

from integration.test_submission_auth import scram_login
from postillon.inbound.accounts import scram_sha256_credentials
from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's self-signed certificate
    return ctx


def _scram(server: ServerProcess, user: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=_tls())
        s.ehlo("client.test")
        return scram_login(s, user, PASSWORD)[0]


def test_new_verifiers_are_strong_and_old_ones_still_log_in(make_server) -> None:  # type: ignore[no-untyped-def]
    sub = free_port()
    server: ServerProcess = make_server(
        listen=[{"kind": "submission", "address": f"127.0.0.1:{sub}"}]
    )
    server.ports = {"submission": sub}
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    for user in ("alice@example.org", "bob@example.org"):
        added = subprocess.run(
            [*server.cli_command(), "user", "add", user, "--password-stdin"],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
    path = server.data_dir / "accounts.json"
    data = json.loads(path.read_text())
    users = data["users"]
    assert users["alice@example.org"]["scram-sha-256"]["iterations"] >= 100_000

    # bob's account as an older postillon made it: a 4,096-iteration verifier.
    old = scram_sha256_credentials(PASSWORD, b"0123456789abcdef", 4096)
    users["bob@example.org"]["scram-sha-256"] = {
        "salt": base64.b64encode(old.salt).decode(),
        "iterations": 4096,
        "stored_key": base64.b64encode(old.stored_key).decode(),
        "server_key": base64.b64encode(old.server_key).decode(),
    }
    path.write_text(json.dumps(data))
    server.start()
    assert _scram(server, "alice@example.org") == 235
    assert _scram(server, "bob@example.org") == 235
