"""DMARC aggregate reports (RFC 7489 §7.2) end to end: evaluations recorded by a real
server, reports built and sent by ``postillon dmarc report --send-now``, received in
Maildirs, the XML parsed.

    smtplib ──▶ A (SPF/DKIM/DMARC on) ── counters in A's queue store
                                               │
                     postillon dmarc report --send-now
                                               │
    _dmarc.author.test TXT p=none rua=mailto:agg@author.test,                 (same org: ok)
                                      mailto:dmarc@vendor.test,     (external, authorised:
                                          author.test._report._dmarc.vendor.test TXT v=DMARC1)
                                      mailto:x@stranger.test         (external, not: dropped)
                                               │
                 mail through A's intake (DKIM-signed for reports.test) ──▶ A's Maildirs
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from dkim_tools import dkimpy_verify_all, key_zone, listed_keys, to_crlf
from support.server import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def world(make_server, make_dns_server) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    rua = "mailto:agg@author.test,mailto:dmarc@vendor.test!1m,mailto:x@stranger.test"
    zones: dict[str, Any] = {
        "author.test": {
            "@": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
            "_dmarc.author.test": {"TXT": [f'"v=DMARC1; p=none; rua={rua}"']},
        },
        "vendor.test": {"author.test._report._dmarc.vendor.test": {"TXT": ['"v=DMARC1"']}},
        "stranger.test": {"@": {"TXT": ['"nothing here"']}},
        "other.test": {"@": {"TXT": ['"v=spf1 -all"']}},
        "quiet.test": {"_dmarc.quiet.test": {"TXT": ['"v=DMARC1; p=none"']}},  # asks for no reports
    }
    dns = make_dns_server(zones)
    a = make_server(
        domain=[
            {"name": "example.org", "mailboxes": ["bob"]},
            {"name": "author.test", "mailboxes": ["agg"]},
            {"name": "vendor.test", "mailboxes": ["dmarc"]},
            {"name": "stranger.test", "mailboxes": ["x"]},
        ],
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        authentication={"enabled": True},
        dmarc_reports={
            "enabled": True,
            "organization": "Receiver Example",
            "contact": "postmaster@reports.test",
            "from": "noreply-dmarc@reports.test",
            "flush_interval": 0.2,
        },
    )
    a.write_config()
    a.data_dir.mkdir(exist_ok=True)
    a.cli("dkim", "keygen", "reports.test", "--selector", "d1", "--algorithm", "ed25519")
    keys = listed_keys(a.cli("dkim", "list", "--json").stdout)
    for origin, data in key_zone(keys).items():
        dns.add_zone(origin, data)
    a.start()
    yield {"a": a, "dns": dns}


def dry_run(a: ServerProcess, day: str, expect: str, timeout: float = 15) -> str:
    """``dmarc report --dry-run`` once the flushed counters show ``expect`` (polling)."""
    deadline = time.monotonic() + timeout
    while True:
        out = a.cli("dmarc", "report", "--dry-run", "--day", day).stdout
        if expect in out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def message(from_: str) -> bytes:
    return f"From: {from_}\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n".encode()


def test_reports_are_built_verified_and_mailed(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    # Two aligned SPF passes, one failure (envelope elsewhere, no DKIM), one domain
    # without rua= (not recorded).
    a.send_message("bob@example.org", message("ann@author.test"), sender="ann@author.test")
    a.send_message("bob@example.org", message("ann@author.test"), sender="ann@author.test")
    a.send_message("bob@example.org", message("ann@author.test"), sender="list@other.test")
    a.send_message("bob@example.org", message("q@quiet.test"), sender="q@quiet.test")

    preview = dry_run(a, today, "(3 messages)")
    assert "author.test: report" in preview and "(3 messages)" in preview, preview
    assert "would mail: mailto:agg@author.test" in preview
    assert "would mail: mailto:dmarc@vendor.test" in preview
    assert "dropped mailto:x@stranger.test: external destination not authorised" in preview
    assert "quiet.test" not in preview

    sent = a.cli("dmarc", "report", "--send-now", "--day", today)
    assert "author.test: report" in sent.stdout and ": sent (queued as" in sent.stdout, sent.stdout

    (path,) = a.wait_for_mail("agg@author.test")
    (vendor_copy,) = a.wait_for_mail("dmarc@vendor.test")
    assert b"Report Domain: author.test" in vendor_copy.read_bytes()
    assert a.maildir_messages("x@stranger.test") == []
    raw = to_crlf(path.read_bytes())
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"].startswith("Report Domain: author.test Submitter: reports.test")
    (part,) = [p for p in msg.walk() if p.get_content_type() == "application/gzip"]
    filename = part.get_filename()
    assert filename.startswith("reports.test!author.test!") and filename.endswith(".xml.gz")
    root = ET.fromstring(gzip.decompress(part.get_payload(decode=True)))
    check_report(root, today)
    # DKIM-signed for the report sender's domain, and the signature verifies.
    assert b"d=reports.test" in raw.split(b"\r\n\r\n")[0]
    assert dkimpy_verify_all(raw, world["dns"].nameserver) == [True]

    again = a.cli("dmarc", "report", "--send-now", "--day", today).stdout
    assert "already-sent" in again, again


def check_report(root: ET.Element, day: str) -> None:
    assert root.tag == "feedback"
    assert root.findtext("report_metadata/org_name") == "Receiver Example"
    assert root.findtext("report_metadata/email") == "postmaster@reports.test"
    begin = int(root.findtext("report_metadata/date_range/begin") or 0)
    assert datetime.datetime.fromtimestamp(begin, datetime.UTC).strftime("%Y-%m-%d") == day
    assert root.findtext("policy_published/domain") == "author.test"
    assert root.findtext("policy_published/p") == "none"
    rows = {}
    for record in root.findall("record"):
        key = (
            record.findtext("identifiers/envelope_from"),
            record.findtext("row/policy_evaluated/spf"),
            record.findtext("row/policy_evaluated/dkim"),
            record.findtext("row/policy_evaluated/disposition"),
        )
        rows[key] = int(record.findtext("row/count") or 0)
        assert record.findtext("row/source_ip") == "127.0.0.1"
        assert record.findtext("identifiers/header_from") == "author.test"
        assert record.findtext("identifiers/envelope_to") == "example.org"
    assert rows == {
        ("author.test", "pass", "fail", "none"): 2,
        ("other.test", "fail", "fail", "none"): 1,
    }
