"""DMARC aggregate reports (dmarcrpt/): rua= parsing, the §7.1 external-destination
check, the Appendix C XML, the recorder's flush, and the reporter with a memory store,
a scripted resolver and the real intake (claims: two nodes send one report)."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from postillon.checks.dmarc_check import parse_record
from postillon.core.clock import FakeClock
from postillon.core.dmarc import AuthResult, DmarcResultCount, PublishedPolicy
from postillon.dmarcrpt.destinations import parse_rua, verify_external
from postillon.dmarcrpt.recorder import DmarcReportRecorder
from postillon.dmarcrpt.report import ReportSettings, build_report
from postillon.dmarcrpt.reporter import DmarcReporter, DmarcReporterSettings
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, TxtRecord
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore

DAY = "2027-01-15"
DAY_START = 1_799_971_200  # 2027-01-15T00:00:00Z
SETTINGS = ReportSettings("Receiver Org", "postmaster@rx.test", "rx.test")


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


def row(ip: str = "192.0.2.1", dkim: str = "pass", count: int = 1) -> DmarcResultCount:
    return DmarcResultCount(
        DAY,
        "author.test",
        PublishedPolicy("author.test", p="quarantine", sp="none", pct=50),
        ip,
        "author.test",
        "bounce.author.test",
        "rx.test",
        "none",
        dkim,
        "fail",
        (AuthResult("author.test", dkim, "s1"),),
        (AuthResult("bounce.author.test", "softfail", "mfrom"),),
        count,
    )


def test_rua_is_parsed_from_the_record_and_split_into_destinations() -> None:
    record = parse_record(
        "v=DMARC1; p=none; rua=mailto:a@x.test!10m, mailto:b%40c@y.test ,https://z"
    )
    assert record is not None
    dests = parse_rua(record.rua)
    assert [(d.address, d.max_size, bool(d.problem)) for d in dests] == [
        ("a@x.test", 10 << 20, False),
        ("", None, True),  # "b%40c@y.test" → "b@c@y.test": not one address
        ("", None, True),  # https: not supported
    ]
    assert parse_rua(("mailto:a@x.test!7k",))[0].max_size == 7 << 10
    assert parse_rua(("mailto:a@x.test!huge",))[0].problem.startswith("bad size")


async def test_external_destinations_need_their_consent() -> None:
    resolver = TxtResolver(
        {
            "author.test._report._dmarc.vendor.test": ["v=DMARC1"],
            "author.test._report._dmarc.odd.test": ["v=spf1 -all"],
            "author.test._report._dmarc.flaky.test": DnsTempError("x", "TXT", "SERVFAIL"),
        }
    )
    (same, vendor, stranger, odd, flaky) = parse_rua(
        tuple(
            f"mailto:r@{d}"
            for d in (
                "reports.author.test",
                "vendor.test",
                "stranger.test",
                "odd.test",
                "flaky.test",
            )
        )
    )
    assert await verify_external(resolver, "author.test", same) == ""  # same org: no lookup
    assert await verify_external(resolver, "author.test", vendor) == ""  # type: ignore[arg-type]
    assert "no TXT record at author.test._report._dmarc.stranger.test" in await verify_external(
        resolver,
        "author.test",
        stranger,  # type: ignore[arg-type]
    )
    assert "no v=DMARC1 record" in await verify_external(resolver, "author.test", odd)  # type: ignore[arg-type]
    assert "failed" in await verify_external(resolver, "author.test", flaky)  # type: ignore[arg-type]


def test_report_xml_follows_appendix_c() -> None:
    built = build_report([row(count=3), row("192.0.2.9", "fail")], "author.test", DAY, SETTINGS)
    assert built.filename == f"rx.test!author.test!{DAY_START}!{DAY_START + 86399}.xml.gz"
    assert gzip.decompress(built.gzipped) == built.xml
    assert (
        build_report([row(count=3), row("192.0.2.9", "fail")], "author.test", DAY, SETTINGS)
        == built
    )
    root = ET.fromstring(built.xml)
    assert root.findtext("report_metadata/org_name") == "Receiver Org"
    assert root.findtext("report_metadata/report_id") == built.report_id
    assert root.findtext("report_metadata/date_range/begin") == str(DAY_START)
    assert [root.findtext(f"policy_published/{t}") for t in ("domain", "p", "sp", "pct")] == [
        "author.test", "quarantine", "none", "50",
    ]  # fmt: skip
    first, second = root.findall("record")
    assert first.findtext("row/count") == "3"
    assert first.findtext("row/policy_evaluated/dkim") == "pass"
    assert first.findtext("identifiers/envelope_from") == "bounce.author.test"
    assert first.findtext("auth_results/dkim/selector") == "s1"
    assert first.findtext("auth_results/spf/scope") == "mfrom"
    assert second.findtext("row/source_ip") == "192.0.2.9"
    assert built.messages == 4


async def test_recorder_counts_and_keeps_counts_when_the_store_fails() -> None:
    store = MemoryStore()
    clock = FakeClock(DAY_START + 60)
    recorder = DmarcReportRecorder(store.policy_state.dmarc_reports, clock)
    for _ in range(3):
        recorder.evaluated(DmarcResultCount(**{**_fields(row()), "day": ""}))  # type: ignore[arg-type]
    assert recorder.pending == 3
    await store.close()  # the store is gone: counts are kept
    await recorder.flush()
    assert recorder.pending == 3
    fresh = MemoryStore()
    recorder._store = fresh.policy_state.dmarc_reports
    await recorder.flush()
    (counted,) = await fresh.policy_state.dmarc_reports.day(DAY)
    assert counted.count == 3 and recorder.pending == 0


def _fields(r: DmarcResultCount) -> dict[str, object]:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


async def test_reporter_sends_once_and_skips_what_it_must(tmp_path: Path) -> None:
    store = MemoryStore()
    rows = [row(count=2)] + [
        DmarcResultCount(**{**_fields(row()), "policy_domain": d})  # type: ignore[arg-type]
        for d in ("gone.test", "none.test", "broken.test")
    ]
    await store.policy_state.dmarc_reports.add(rows)
    resolver = TxtResolver(
        {
            "_dmarc.author.test": [
                "v=DMARC1; p=none; rua=mailto:agg@author.test,mailto:x@stranger.test"
            ],
            "_dmarc.none.test": ["v=DMARC1; p=none"],  # stopped asking
            "_dmarc.broken.test": DnsTempError("_dmarc.broken.test", "TXT", "SERVFAIL"),
        }
    )
    clock = FakeClock(DAY_START + 90000)
    intake = Intake(store, "mx.rx.test", tmp_path, clock=clock)
    settings = DmarcReporterSettings(SETTINGS, "noreply-dmarc@rx.test", owner="node-a")
    counters = store.policy_state.dmarc_reports
    one = DmarcReporter(counters, resolver, intake, settings, clock)  # type: ignore[arg-type]
    two = DmarcReporter(counters, resolver, intake, settings, clock)  # type: ignore[arg-type]

    dry = {o.domain: o for o in await one.report_day(DAY, dry_run=True)}
    assert dry["author.test"].status == "dry-run"
    assert [d.address for d in dry["author.test"].destinations] == ["agg@author.test"]
    assert dry["author.test"].dropped[0][0] == "mailto:x@stranger.test"
    assert dry["gone.test"].status == "no-record"
    assert dry["none.test"].status == "no-destination"
    assert dry["broken.test"].status == "dns-error"
    assert await store.list_messages() == []  # nothing queued by a dry run

    sent = {o.domain: o for o in await one.report_day(DAY)}
    assert sent["author.test"].status == "sent" and "queued as" in sent["author.test"].detail
    again = {o.domain: o for o in await two.report_day(DAY)}
    assert again["author.test"].status == "already-sent"
    (queued,) = await store.list_messages()  # one message, to the one verified destination
    assert [r.recipient for r in queued.records] == ["agg@author.test"]
    assert queued.sender == "noreply-dmarc@rx.test"


@pytest.mark.parametrize("size,sent", [("!1k", False), ("!1m", True)])
async def test_a_destination_size_limit_is_kept(tmp_path: Path, size: str, sent: bool) -> None:
    store = MemoryStore()
    await store.policy_state.dmarc_reports.add([row(f"192.0.2.{i}") for i in range(1, 120)])
    resolver = TxtResolver(
        {"_dmarc.author.test": [f"v=DMARC1; p=none; rua=mailto:a@author.test{size}"]}
    )
    clock = FakeClock(DAY_START + 90000)
    intake = Intake(store, "mx.rx.test", tmp_path, clock=clock)
    settings = DmarcReporterSettings(SETTINGS, "noreply-dmarc@rx.test")
    reporter = DmarcReporter(store.policy_state.dmarc_reports, resolver, intake, settings, clock)  # type: ignore[arg-type]
    (outcome,) = await reporter.report_day(DAY)
    assert (outcome.status == "sent") is sent
    if not sent:
        assert "over the size limit" in outcome.dropped[0][1]
