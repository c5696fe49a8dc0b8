"""Prometheus metrics after real traffic, scraped from the admin server and
parsed with prometheus_client's own parser; every value is checked.

    smtplib (127.0.0.1, trusted) ──▶ A ──▶ Maildir (alice)
    smtplib (127.0.0.2, not)     ──▶ A     ──smtp:[127.0.0.1]:Q, STARTTLS──▶ B (remote.test)
    smtplib STARTTLS + bad AUTH  ──▶ A:submission
                                     A ──MX lookup of nodns.test──▶ 127.0.0.1:9 (no DNS: deferred)
    urllib ──▶ A's admin server /metrics (Bearer token)
"""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from support.metrics import scrape, total, value
from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_metrics_after_real_traffic(make_server) -> None:  # type: ignore[no-untyped-def]
    b_port = free_port()
    b: ServerProcess = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.1:{b_port}"}],
        domain=[{"name": "remote.test", "mailboxes": ["bob"]}],
    ).start()
    smtp_port, submission_port, admin_port = free_port(), free_port(), free_port()
    smtp_label = f"smtp:127.0.0.1:{smtp_port}"
    submission_label = f"submission:127.0.0.1:{submission_port}"
    a: ServerProcess = make_server(
        listen=[
            {"kind": "smtp", "address": f"127.0.0.1:{smtp_port}"},
            {"kind": "submission", "address": f"127.0.0.1:{submission_port}"},
        ],
        relay={"trusted_networks": ["127.0.0.1/32"]},
        transport=[{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{b_port}"}],
        queue={"first_retry": 3600.0, "max_retry": 3600.0},
        admin={"listen": f"127.0.0.1:{admin_port}"},
        # On here: an untrusted client's mail is checked (and, without DNS, deferred).
        authentication={"enabled": True},
    ).start()
    token = a.cli("admin", "token").stdout.strip()
    url = f"http://127.0.0.1:{admin_port}/metrics"

    # Before any mail: the process and the (empty) queue are there.
    before = scrape(url, token)
    assert total(before, "postillon_info") == 1
    assert value(before, "postillon_queue_records", state="pending") == 0

    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
        for n in range(3):
            client.sendmail("s@sender.test", ["alice@example.org"], f"Subject: {n}\r\n\r\nx\r\n")
        client.ehlo()
        client.mail("s@sender.test")
        assert client.rcpt("nobody@example.org")[0] == 550  # unknown_recipient
        client.rset()
        client.sendmail("s@sender.test", ["bob@remote.test"], "Subject: out\r\n\r\nvia B\r\n")
        client.sendmail("s@sender.test", ["y@nodns.test"], "Subject: dns\r\n\r\nno DNS\r\n")
    # An untrusted client may not relay.
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.ehlo()
        c.mail("s@sender.test")
        assert c.rcpt("x@elsewhere.test")[0] == 554  # relay_denied
        c.rset()
        # Its mail is checked (SPF/DMARC); without DNS the check defers it.
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            message = "From: s@sender.test\r\nSubject: x\r\n\r\ny\r\n"
            c.sendmail("s@sender.test", ["alice@example.org"], message)
        assert deferred.value.smtp_code == 451  # authentication
    # STARTTLS in, then a wrong password on the submission port.
    with smtplib.SMTP("127.0.0.1", submission_port, timeout=10) as c:
        c.starttls(context=_unverified())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("nobody", "wrong password")

    a.wait_for_mail("alice@example.org", 3)
    b.wait_for_mail("bob@remote.test")
    wait_for(lambda: "deferred: to=<y@nodns.test>" in a.maillog(), "nodns.test not deferred")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in a.maillog(), "no reload")

    def settled() -> bool:
        s = scrape(url, token)
        return (
            total(s, "postillon_connections_active", direction="in") == 0
            and total(s, "postillon_messages_delivered_total") == 4
            # (the mail log says "deferred" just before the store records it)
            and value(s, "postillon_queue_records", state="deferred") == 1
        )

    wait_for(settled, "sessions still open or deliveries not counted")
    s = scrape(url, token)
    # Mail flow, by listener and reason.
    assert value(s, "postillon_messages_received_total", listener=smtp_label) == 5
    assert value(s, "postillon_messages_delivered_total", transport="maildir") == 3
    assert value(s, "postillon_messages_delivered_total", transport="smtp") == 1
    assert value(s, "postillon_messages_deferred_total", transport="smtp", reason="4.4") == 1
    assert total(s, "postillon_messages_bounced_total") == 0
    rejected = {
        dict(labels)["reason"]: v
        for (name, labels), v in s.items()
        if name == "postillon_messages_rejected_total" and v
    }
    assert rejected == {"unknown_recipient": 1, "relay_denied": 1, "authentication": 1}
    assert (
        value(s, "postillon_messages_rejected_total", listener=smtp_label, reason="relay_denied")
        == 1
    )
    # The queue: only the message for nodns.test waits.
    assert value(s, "postillon_queue_records", state="deferred") == 1
    assert value(s, "postillon_queue_records", state="pending") == 0
    # Latency: four final outcomes, one attempt each (plus the deferred one).
    assert value(s, "postillon_delivery_seconds_count", outcome="delivered") == 4
    assert value(s, "postillon_delivery_seconds_bucket", outcome="delivered", le="+Inf") == 4
    assert value(s, "postillon_delivery_attempt_seconds_count", transport="maildir") == 3
    assert value(s, "postillon_delivery_attempt_seconds_count", transport="smtp") == 2
    # Connections and TLS, in and out (ServerProcess.start's readiness probe
    # connects once to each listener).
    assert value(s, "postillon_connections_total", direction="in", listener=smtp_label) == 1 + 2
    in_submission = value(
        s, "postillon_connections_total", direction="in", listener=submission_label
    )
    assert in_submission == 1 + 1
    assert value(s, "postillon_connections_total", direction="out", listener="") == 1
    assert total(s, "postillon_tls_sessions_total", direction="in") == 1
    assert total(s, "postillon_tls_sessions_total", direction="out") == 1
    assert value(s, "postillon_tls_sessions_total", direction="out", version="TLSv1.3") == 1
    # AUTH, DNS, reloads.
    # smtplib's login() tries PLAIN, then LOGIN: two failures.
    for mechanism in ("PLAIN", "LOGIN"):
        assert (
            value(
                s,
                "postillon_auth_failures_total",
                listener=submission_label,
                mechanism=mechanism,
            )
            == 1
        )
    assert value(s, "postillon_dns_lookup_seconds_count", rdtype="MX", result="tempfail") >= 1
    assert value(s, "postillon_config_reloads_total", result="ok") == 1
    # Never a queue id or an address in a label.
    for (_, labels), _v in s.items():
        for _k, label_value in labels:
            assert "@" not in label_value


def test_metrics_need_the_token(make_server) -> None:  # type: ignore[no-untyped-def]
    admin_port = free_port()
    a: ServerProcess = make_server(admin={"listen": f"127.0.0.1:{admin_port}"}).start()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", admin_port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10)
    assert refused.value.code == 401
    token = a.cli("admin", "token").stdout.strip()
    assert total(scrape(f"http://127.0.0.1:{admin_port}/metrics", token), "postillon_info") == 1

    # POST /api/reload answers with the result; `postillon reload --api` uses it.
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/api/reload",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == b'{"applied": true, "error": null, "restart_needed": []}'
    import os
    import subprocess

    a.config_path.write_text(a.config_path.read_text() + "\n[limits]\nrecipients = 5\n")
    result = subprocess.run(
        [*a.cli_command(), "reload", "--api"],
        capture_output=True,
        text=True,
        env={**os.environ, "POSTILLON_ADMIN_TOKEN": token},
        timeout=60,
    )
    # The CLI checks the file first: nothing is sent.
    assert result.returncode == 2 and "limits.recipients" in result.stderr
    with pytest.raises(urllib.error.HTTPError) as conflict:
        urllib.request.urlopen(request, timeout=10)
    assert conflict.value.code == 409
    assert "limits.recipients" in conflict.value.read().decode()
