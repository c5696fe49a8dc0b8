"""TlsReporter with a memory store, a scripted resolver and the real intake: what is
sent where, claims (two nodes send one report), dry runs, and DNS trouble."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import logging
from pathlib import Path

import pytest

from postillon.core.clock import FakeClock
from postillon.core.tlsrpt import SUCCESS, TlsResultCount
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, TxtRecord
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore
from postillon.tlsrpt.report import ReportSettings, day_range
from postillon.tlsrpt.reporter import ReporterSettings, TlsReporter

DAY = "2027-01-15"
SETTINGS = ReporterSettings(
    ReportSettings("Org", "mailto:c@sender.test", "sender.test"),
    sender="noreply-tlsrpt@sender.test",
    http_timeout=1.0,
    owner="node-a",
)


class TxtResolver:
    def __init__(self, records: dict[str, list[str] | Exception]) -> None:
        self.records = records

    async def txt(self, name: str) -> Answer[TxtRecord]:
        found = self.records.get(name)
        if found is None:
            raise DnsNotFound(name, "TXT", "NXDOMAIN", nxdomain=True)
        if isinstance(found, Exception):
            raise found
        return Answer(name, tuple(TxtRecord((t.encode(),)) for t in found), 60, name, False)


async def setup(
    tmp_path: Path, records: dict[str, list[str] | Exception]
) -> tuple[MemoryStore, TlsReporter, TlsReporter]:
    store = MemoryStore()
    await store.tls_reports.add(
        [
            TlsResultCount(DAY, d, "no-policy-found", (), SUCCESS, count=3)
            for d in ("a.test", "b.test", "c.test")
        ]
    )
    clock = FakeClock(day_range(DAY)[1] + 3600)
    intake = Intake(store, "mx.sender.test", tmp_path, clock=clock)
    resolver = TxtResolver(records)
    one = TlsReporter(store.tls_reports, resolver, intake, SETTINGS, clock)  # type: ignore[arg-type]
    two = TlsReporter(store.tls_reports, resolver, intake, SETTINGS, clock)  # type: ignore[arg-type]
    return store, one, two


async def test_mail_goes_through_intake_once_for_two_nodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, one, two = await setup(
        tmp_path,
        {
            "_smtp._tls.a.test": ["v=TLSRPTv1; rua=mailto:r1@a.test, mailto:r2@a.test"],
            "_smtp._tls.b.test": DnsTempError("_smtp._tls.b.test", "TXT", "SERVFAIL"),
        },
    )
    caplog.set_level(logging.INFO, "postillon.tlsrpt")
    preview = await one.report_day(DAY, dry_run=True)
    assert [(o.domain, o.status) for o in preview] == [
        ("a.test", "dry-run"),
        ("b.test", "dns-error"),
        ("c.test", "no-record"),
    ]
    assert await store.list_messages() == []  # a dry run sends nothing, claims nothing

    first = await one.report_day(DAY)
    second = await two.report_day(DAY)
    (a1,) = [o for o in first if o.domain == "a.test"]
    (a2,) = [o for o in second if o.domain == "a.test"]
    assert a1.status == "sent" and a2.status == "already-sent"
    (delivery,) = a1.deliveries
    assert delivery.ok and delivery.destination == "mailto:r1@a.test, mailto:r2@a.test"
    (queued,) = await store.list_messages()
    assert queued.sender == "noreply-tlsrpt@sender.test"
    assert sorted(r.recipient for r in queued.records) == ["r1@a.test", "r2@a.test"]
    body = b"".join([c async for c in store.read_body(queued.queue_id)])
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert msg["Received"] is not None  # intake's trace: it went the one way in
    (part,) = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(part.get_payload(decode=True)))  # type: ignore[arg-type]
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 3
    # DNS trouble is a warning; no record at all only an info line.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("b.test" in w and "SERVFAIL" in w for w in warnings), warnings
    assert not any("c.test" in w for w in warnings)


async def test_no_intake_is_a_failed_delivery_not_a_crash(tmp_path: Path) -> None:
    store = MemoryStore()
    await store.tls_reports.add([TlsResultCount(DAY, "a.test", "no-policy-found", (), SUCCESS)])
    resolver = TxtResolver({"_smtp._tls.a.test": ["v=TLSRPTv1; rua=mailto:r@a.test"]})
    reporter = TlsReporter(store.tls_reports, resolver, None, SETTINGS, FakeClock())  # type: ignore[arg-type]
    (outcome,) = await reporter.report_day(DAY)
    (delivery,) = outcome.deliveries
    assert not delivery.ok and "no intake" in delivery.detail


async def test_unreachable_collector_is_a_failed_delivery(tmp_path: Path) -> None:
    """The collector's name does not resolve (postillon's resolver, not the machine's)."""
    store = MemoryStore()
    await store.tls_reports.add([TlsResultCount(DAY, "a.test", "no-policy-found", (), SUCCESS)])

    class NoAddresses(TxtResolver):
        async def addresses(self, name: str) -> Answer[str]:
            raise DnsNotFound(name, "A", "NXDOMAIN", nxdomain=True)

    resolver = NoAddresses({"_smtp._tls.a.test": ["v=TLSRPTv1; rua=https://nowhere.test/r"]})
    reporter = TlsReporter(store.tls_reports, resolver, None, SETTINGS, FakeClock())  # type: ignore[arg-type]
    (outcome,) = await reporter.report_day(DAY)
    (delivery,) = outcome.deliveries
    assert not delivery.ok and "nowhere.test has no A or AAAA record" in delivery.detail
