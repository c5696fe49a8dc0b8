"""``postillon explain``: the story of a delivered, a quarantined and a refused message,
a refused client found by IP, and a simulation, from the real server's trace.

    smtplib (127.0.0.x) ──SMTP──▶ postillon serve ──decisions──▶ queue store (SQLite)
                                                                       │
                         postillon explain (another process) ◀─────────┘
"""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.test_port25_protection import ZONES
from postillon.testing.dns_server import DnsServer
from support.server import ServerProcess, default_config


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("explain") / "srv"
    root.mkdir()
    config = default_config(
        root,
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        dnsbl={"zones": {"zen.example": 2, "weak.example": 1}, "threshold": 2},
        client_checks={"reverse_dns": True},
        explain={"flush_interval": 0.1},
    )
    proc = ServerProcess(root, config).start()
    yield proc
    proc.stop()


def explain(server: ServerProcess, *args: str) -> str:
    """``postillon explain ARGS`` once the trace has what is asked (flushed every 0.1s)."""
    deadline = time.monotonic() + 20
    while True:
        result = server.cli("explain", *args, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout
        time.sleep(0.1)


def send(server: ServerProcess, source: str, rcpts: list[str]) -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10, source_address=(source, 0)) as client:
        client.ehlo("host3.client.example")
        client.mail("someone@remote.example")
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(b"Subject: explain me\r\n\r\nhi\r\n")
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_the_story_of_a_delivered_message(server: ServerProcess) -> None:
    queue_id = send(server, "127.0.0.3", ["alice@example.org", "nobody@example.org"])
    out = explain(server, queue_id)
    assert "connect · dnsbl: continue — 127.0.0.3: weak.example (127.0.0.2) weight +1" in out
    assert "score 1, threshold 2" in out
    assert "connect · reverse_dns: continue — 127.0.0.3 is host3.client.example" in out
    assert "rcpt · relay: continue — <alice@example.org> is a local mailbox" in out
    assert "rcpt · relay: reject" in out and "nobody@example.org" in out
    assert f"end_of_data · session: queued → 250 2.0.0 Ok: queued as {queue_id}" in out
    lines = [ln for ln in out.splitlines() if ln[:4].strip().rstrip(".").isdigit()]
    assert [int(ln.split(".")[0]) for ln in lines] == list(range(1, len(lines) + 1))


def test_a_refused_client_is_found_by_ip(server: ServerProcess) -> None:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(host, int(port), timeout=10, source_address=("127.0.0.2", 0))
    out = explain(server, "--client", "127.0.0.2", "--rejected")
    assert "session S" in out and "from 127.0.0.2" in out
    assert "connect · dnsbl: reject" in out and "blocked using zen.example" in out
    session_id = out.split("session ", 1)[1].split()[0]
    assert "dnsbl: reject" in explain(server, session_id)
    data = json.loads(explain(server, "--client", "127.0.0.2", "--json"))
    assert data[0][-1]["action"] == "reject" and data[0][-1]["check"] == "dnsbl"


def test_simulate_replays_without_queueing(server: ServerProcess, tmp_path: Path) -> None:
    message = tmp_path / "saved.eml"
    message.write_bytes(b"From: someone@remote.example\nSubject: saved\n\nhello\n")
    before = sorted(server.iter_all_mail())
    out = explain(
        server, "--simulate", str(message), "--client", "127.0.0.3",
        "--helo", "host3.client.example", "--from", "someone@remote.example",
        "--to", "team@example.org",
    )  # fmt: skip
    assert "rcpt · relay: continue — <team@example.org> is local, delivered to" in out
    assert "outcome: accepted for alice@example.org, bob@example.org (not queued" in out
    refused = explain(
        server, "--simulate", str(message), "--client", "127.0.0.2",
        "--to", "alice@example.org",
    )  # fmt: skip
    assert "outcome: refused at connect: 554 5.7.1" in refused
    time.sleep(0.5)
    assert sorted(server.iter_all_mail()) == before
