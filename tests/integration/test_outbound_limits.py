"""RFC 9422 LIMITS end to end: postillon B advertises RCPTMAX=100 MAILMAX=1;
postillon A delivers 150 recipients as two transactions (100 + 50) on two
connections, with no 452 and nothing deferred.

    smtplib ──150 RCPT──▶ A ──MAIL, 100 RCPT, DATA──▶ B   (connection 1: MAILMAX reached)
                            ──MAIL,  50 RCPT, DATA──▶ B   (connection 2)
"""

from __future__ import annotations

import smtplib
import time
from typing import Any

import pytest

from support.ports import free_port

pytestmark = pytest.mark.integration

B_HOST = "127.0.0.5"
MESSAGE = b"From: alice@example.org\r\nSubject: many\r\n\r\nhello all\r\n"


def test_a_delivery_is_split_to_fit_the_receivers_rcptmax_and_mailmax(
    make_server: Any, make_dns_server: Any
) -> None:
    dns = make_dns_server(
        {"remote.test": {"@": {"MX": "10 mx.remote.test"}, "mx.remote.test": {"A": B_HOST}}}
    )
    port = free_port(B_HOST)
    b = make_server(
        listen=[{"kind": "smtp", "address": f"{B_HOST}:{port}"}],
        domain=[{"name": "remote.test", "mailboxes": ["info"], "catch_all": "info"}],
        limits={"recipients": 100, "messages_per_connection": 1},
    ).start()
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 5.0},
        # All 150 recipients claimed at once, so they form one delivery job.
        queue={"first_retry": 1.0, "max_retry": 2.0, "concurrency": 500},
    ).start()
    with smtplib.SMTP(B_HOST, port, timeout=10) as probe:
        code, text = probe.ehlo("probe.test")
    assert "LIMITS RCPTMAX=100 MAILMAX=1" in text.decode()

    rcpts = [f"user{i}@remote.test" for i in range(150)]
    host, _, a_port = a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(a_port), timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(MESSAGE)
    assert code == 250
    qid = reply.decode().rsplit(" ", 1)[1]
    deadline = time.monotonic() + 60
    while a.maillog().count(f"{qid}: delivered:") < 150 and time.monotonic() < deadline:
        time.sleep(0.2)
    log = a.maillog()
    assert log.count(f"{qid}: delivered:") == 150, log[-3000:]
    assert f"{qid}: deferred" not in log and "452" not in log
    received = [line for line in b.maillog().splitlines() if "received:" in line]
    assert len(received) == 2  # one message per transaction, on two connections
    assert "nrcpt=100" in received[0] and "nrcpt=50" in received[1]
