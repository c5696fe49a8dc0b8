"""TLS reporting (RFC 8460) end to end: sessions recorded by a real server, reports
built and sent by ``postillon tls report --send-now``, received by a mailbox and an
HTTPS collector.

    smtplib ──▶ A ──DNS MX (test server)──▶ wrong.mx.test 127.0.0.3  test CA, another name
                │                      └──▶ good.mx.test  127.0.0.2  test CA, right name
                │   (verify.test: [[tls_policy]] verify → wrong fails, good takes the mail)
                │
                └─ counters in A's queue store ── postillon tls report --send-now ──┐
                                                                                    │
       _smtp._tls.verify.test TXT rua=mailto:tls@reports.test,https://collector... │
                   ┌────────────────────────────────────────────────────────────────┘
                   ├─ mail through A's intake (DKIM-signed for sender.test) ──▶ A's Maildir
                   └─ HTTPS POST application/tlsrpt+gzip ──▶ collector.test 127.0.0.80

Bad input on the side: a domain with two v=TLSRPTv1 records and one with a malformed
rua get no report (a log line); a collector that stalls costs one timeout.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from dkim_tools import dkimpy_verify_all, key_zone, listed_keys, to_crlf
from support.https_server import Answer, HttpsServer
from support.ports import free_port
from support.recording_smtp import RecordingSmtp
from support.server import ServerProcess
from support.tls_certs import ca_issued

pytestmark = pytest.mark.integration

GOOD, WRONG = "127.0.0.2", "127.0.0.3"
COLLECTOR = "127.0.0.80"


def _txt(*records: str) -> list[str]:
    return [f'"{r}"' for r in records]


@pytest.fixture
def world(make_server, make_dns_server, tmp_path: Path) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port(GOOD)
    recs = {
        "good": RecordingSmtp(ca_issued(ca, "good.mx.test"), GOOD, "good.mx.test", port=port),
        "wrong": RecordingSmtp(ca_issued(ca, "elsewhere.test"), WRONG, "wrong.mx.test", port=port),
    }
    for rec in recs.values():
        rec.start()
    web_port = free_port(COLLECTOR)
    web = HttpsServer(tmp_path / "web", COLLECTOR, ["collector.test"], port=web_port)
    web.answers["/tlsrpt"] = Answer(200, b"thanks\n")
    web.answers["/slow"] = Answer(200, b"late\n", delay=5.0)
    collector = f"https://collector.test:{web_port}"
    mx = {"MX": ["10 wrong.mx.test", "20 good.mx.test"]}
    zones: dict[str, Any] = {
        "mx.test": {"good.mx.test": {"A": GOOD}, "wrong.mx.test": {"A": WRONG}},
        "collector.test": {"@": {"A": COLLECTOR}},
        "verify.test": {
            "@": mx,
            "_smtp._tls.verify.test": {
                "TXT": _txt(
                    f"v=TLSRPTv1; rua=mailto:tls@reports.test,{collector}/tlsrpt",
                    "v=spf1 -all",  # not a TLSRPT record: ignored
                )
            },
        },
        "stall.test": {
            "@": {"MX": ["10 good.mx.test"]},
            "_smtp._tls.stall.test": {"TXT": _txt(f"v=TLSRPTv1; rua={collector}/slow")},
        },
        "twice.test": {
            "@": {"MX": ["10 good.mx.test"]},
            "_smtp._tls.twice.test": {
                "TXT": _txt(
                    "v=TLSRPTv1; rua=mailto:tls@reports.test",
                    "v=TLSRPTv1; rua=mailto:other@reports.test",
                )
            },
        },
        "bad.test": {
            "@": {"MX": ["10 good.mx.test"]},
            "_smtp._tls.bad.test": {"TXT": _txt("v=TLSRPTv1; rua=tls@reports.test")},  # no scheme
        },
        "quiet.test": {"@": {"MX": ["10 good.mx.test"]}},  # no _smtp._tls at all
    }
    dns = make_dns_server(zones)
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        domain=[{"name": "reports.test", "mailboxes": ["tls"]}],
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0, "messages_per_connection": 1},
        tls_policy=[
            {"domain": "verify.test", "policy": "verify", "ca_file": str(tmp_path / "ca.pem")}
        ],
        tls_reports={
            "enabled": True,
            "organization": "Sender Example",
            "contact": "mailto:postmaster@sender.test",
            "from": "noreply-tlsrpt@sender.test",
            "flush_interval": 0.2,
            "http_timeout": 1.0,
            "ca_file": str(web.ca_file),
        },
    )
    a.write_config()
    a.data_dir.mkdir(exist_ok=True)
    a.cli("dkim", "keygen", "sender.test", "--selector", "tls1", "--algorithm", "ed25519")
    keys = listed_keys(a.cli("dkim", "list", "--json").stdout)
    for origin, data in key_zone(keys).items():
        dns.add_zone(origin, data)
    a.start()
    with web:
        yield {"a": a, "recs": recs, "web": web, "dns": dns}
    for rec in recs.values():
        rec.stop()


def dry_run(a: ServerProcess, day: str, expect: str, timeout: float = 10) -> str:
    """``tls report --dry-run`` once the flushed counters show ``expect``."""
    deadline = time.monotonic() + timeout
    while True:
        out = a.cli("tls", "report", "--dry-run", "--day", day).stdout
        if expect in out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_reports_are_built_and_sent_by_mail_and_https(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    web: HttpsServer = world["web"]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    for rcpt in ("u1@verify.test", "u2@verify.test", "u@stall.test", "u@twice.test"):
        line = a.wait_outcome(a.send_message(rcpt), ("delivered",))
        assert "good.mx.test" in line, line
    for rcpt in ("u@bad.test", "u@quiet.test"):
        a.wait_outcome(a.send_message(rcpt), ("delivered",))

    # The counters reach the store (flush_interval 0.2 s); nothing is sent by a dry run.
    preview = dry_run(a, today, "2 successful, 2 failed")
    assert "verify.test: report" in preview and "2 successful, 2 failed" in preview, preview
    assert "would mail: mailto:tls@reports.test" in preview
    assert web.posts == []

    sent = a.cli("tls", "report", "--send-now", "--day", today, check=False)
    out = sent.stdout
    assert sent.returncode == 1, out + sent.stderr  # the stalled collector failed
    assert "sent: mailto:tls@reports.test: queued as" in out, out
    assert "sent: https://collector.test:" in out and "/tlsrpt: HTTP 200" in out, out
    assert "FAILED: https://collector.test:" in out and "timed out after 1 s" in out, out
    # Bad records: no report, and the reason is said (RFC 8460 §3).
    assert "twice.test: no report (_smtp._tls.twice.test: 2 v=TLSRPTv1 records" in out, out
    assert "bad.test: no report (_smtp._tls.bad.test: malformed rua URI" in out, out
    assert "quiet.test: no report (no TXT record at _smtp._tls.quiet.test)" in out, out

    # (b) the HTTPS collector: one POST of the gzipped JSON.
    (post,) = [p for p in web.posts if p[0] == "/tlsrpt"]
    _, headers, body = post
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(body))
    check_report(report, today)

    # (a) the mailbox: the report message, through the queue, DKIM-signed.
    (path_mail,) = a.wait_for_mail("tls@reports.test")
    raw = to_crlf(path_mail.read_bytes())
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["TLS-Report-Domain"] == "verify.test"
    assert msg["TLS-Report-Submitter"] == "sender.test"
    assert msg["Subject"].startswith("Report Domain: verify.test Submitter: sender.test")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    attachment = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    (part,) = attachment
    filename = part.get_filename()
    assert filename.startswith("sender.test!verify.test!") and filename.endswith(".json.gz")
    mailed = json.loads(gzip.decompress(part.get_payload(decode=True)))
    assert mailed == report  # the same report both ways
    assert b"d=sender.test" in raw.split(b"\r\n\r\n")[0]
    assert dkimpy_verify_all(raw, world["dns"].nameserver) == [True]

    # Sent once: a second run (or another node) finds the claim.
    again = a.cli("tls", "report", "--send-now", "--day", today, check=False).stdout
    assert "not sent: claimed before" in again, again
    assert len([p for p in web.posts if p[0] == "/tlsrpt"]) == 1
    # ... and each bad record was a log line (a warning: the CLI's stderr).
    assert "TLS report for twice.test (" in sent.stderr, sent.stderr
    assert "not sent: _smtp._tls.twice.test: 2 v=TLSRPTv1 records" in sent.stderr
    assert "TLS report for bad.test (" in sent.stderr
    assert "quiet.test" not in sent.stderr  # no record at all is no news

    # A restart keeps the counters (they are in the queue store).
    a.stop()
    a.start()
    assert "2 successful, 2 failed" in dry_run(a, today, "2 successful, 2 failed")


def check_report(report: dict[str, Any], day: str) -> None:
    assert report["organization-name"] == "Sender Example"
    assert report["contact-info"] == "mailto:postmaster@sender.test"
    assert report["date-range"] == {
        "start-datetime": f"{day}T00:00:00Z",
        "end-datetime": f"{day}T23:59:59Z",
    }
    assert report["report-id"] == f"{day}T00:00:00Z_verify.test@sender.test"
    (policy,) = report["policies"]
    # A [[tls_policy]] rule is the sender's own setting, not a published policy.
    assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": "verify.test"}
    assert policy["summary"] == {
        "total-successful-session-count": 2,
        "total-failure-session-count": 2,
    }
    (detail,) = policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "wrong.mx.test"
    assert detail["receiving-ip"] == WRONG
    assert detail["sending-mta-ip"].startswith("127.")
    assert detail["failed-session-count"] == 2
    assert detail["failure-reason-code"] == "not-verified"
