"""RFC 8460 pure parts, table-driven: the label table, the _smtp._tls record, the
report builder (recorded rows → JSON), the report message, the daily schedule on a
manual clock, and the recorder's counting and flushing."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from email.message import EmailMessage
from typing import Any

import pytest

from postillon.core.clock import FakeClock
from postillon.core.tlsrpt import RESULT_TYPES, SUCCESS, TlsResultCount, utc_day
from postillon.outbound.tls_observer import TlsSessionResult
from postillon.queue.memory_store import MemoryStore
from postillon.tlsrpt.labels import RESULT_TYPE, result_type
from postillon.tlsrpt.message import report_message
from postillon.tlsrpt.policy_record import NoTlsRpt, TlsRptRecord, parse_records
from postillon.tlsrpt.recorder import TlsReportRecorder
from postillon.tlsrpt.report import ReportSettings, build_report, day_range
from postillon.tlsrpt.schedule import DailyReports, next_run

DAY = "2027-01-15"
T_DAY = day_range(DAY)[0]  # 2027-01-15T00:00:00Z
SETTINGS = ReportSettings("Example Sender Inc.", "mailto:tls@sender.test", "sender.test")

# -- labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "label", "reason", "expected"),
    [
        ("verify", "verified", "", SUCCESS),
        ("fingerprint", "pinned", "", SUCCESS),
        ("dane", "dane-ee", "", SUCCESS),
        ("dane", "dane-ta", "", SUCCESS),
        ("opportunistic", "unverified", "", SUCCESS),
        ("verify", "sts", "", SUCCESS),  # MTA-STS's pass
        ("opportunistic", "plaintext", "", "starttls-not-supported"),
        ("encrypt", "starttls-not-supported", "", "starttls-not-supported"),
        ("verify", "starttls-refused", "", "starttls-not-supported"),
        (
            "verify",
            "not-verified",
            "leaf certificate has no matching subjectAltName for x",
            "certificate-host-mismatch",
        ),
        (
            "verify",
            "not-verified",
            "cert is not valid at validation time (...)",
            "certificate-expired",
        ),
        ("verify", "not-verified", "candidates exhausted", "certificate-not-trusted"),
        ("fingerprint", "fingerprint-mismatch", "", "certificate-not-trusted"),
        ("verify", "handshake-failed", "", "validation-failure"),
        ("dane", "tlsa-mismatch", "", "validation-failure"),
        ("dane", "tlsa-unusable", "", "tlsa-invalid"),
        ("dane", "dnssec-bogus", "", "dnssec-invalid"),
        ("dane", "dane-lookup-failed", "", "dnssec-invalid"),
        ("dane", "dane-unavailable", "", "dane-required"),
        ("verify", "sts-webpki-invalid", "", "sts-webpki-invalid"),  # RFC names pass through
        ("verify", "certificate-host-mismatch", "", "certificate-host-mismatch"),
        ("verify", "something-new", "", "validation-failure"),  # §4.3.3 general failure
        ("none", "plaintext", "", None),  # TLS never tried: nothing to report
        ("verify", "config-error", "", None),  # our CA file, not their server
    ],
)
def test_result_type(mode: str, label: str, reason: str, expected: str | None) -> None:
    assert result_type(mode, label, reason) == expected


def test_the_table_maps_only_to_rfc_8460_names() -> None:
    assert set(RESULT_TYPE.values()) <= RESULT_TYPES | {SUCCESS}
    assert len(RESULT_TYPES) == 11


# -- the _smtp._tls record ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:tls@d.test"], TlsRptRecord(("tls@d.test",), ())),
        (
            ["v=TLSRPTv1;rua=mailto:a@d.test,https://r.d.test/x;"],
            TlsRptRecord(("a@d.test",), ("https://r.d.test/x",)),
        ),
        (
            ["v=TLSRPTv1 ; rua=mailto:tls%2Dreports@d.test , mailto:c@d.test ; ext=1"],
            TlsRptRecord(("tls-reports@d.test", "c@d.test"), ()),
        ),
        (
            ["v=spf1 -all", "v=TLSRPTv1; rua=https://r.d.test:8443/tlsrpt; future=x"],
            TlsRptRecord((), ("https://r.d.test:8443/tlsrpt",)),
        ),
        (["v=TLSRPTv1; rua=mailto:a@d.test?subject=x"], TlsRptRecord(("a@d.test",), ())),
        (["v=TLSRPTv1; rua=ftp://x.test, mailto:a@d.test"], TlsRptRecord(("a@d.test",), ())),
    ],
)
def test_good_records(texts: list[str], expected: TlsRptRecord) -> None:
    assert parse_records(texts) == expected


@pytest.mark.parametrize(
    ("texts", "why"),
    [
        ([], "no v=TLSRPTv1"),
        (["v=spf1 -all"], "no v=TLSRPTv1"),
        (["v=TLSRPTv1; rua=mailto:a@d.test", "v=TLSRPTv1; rua=mailto:b@d.test"], "2 v=TLSRPTv1"),
        (["v=TLSRPTv1"], "no rua="),
        (["v=TLSRPTv1; rua="], "malformed rua URI"),
        (["v=TLSRPTv1; rua=tls@d.test"], "malformed rua URI"),  # no scheme
        (["v=TLSRPTv1; rua=mailto:not an address"], "malformed rua address"),
        (["v=TLSRPTv1; rua=mailto:"], "malformed rua URI"),
        (["v=TLSRPTv1; rua=https://"], "malformed rua URL"),
        (["v=TLSRPTv1; rua=mailto:a@d.test; rua=mailto:b@d.test"], "rua= given twice"),
        (["v=TLSRPTv1; garbage; rua=mailto:a@d.test"], "malformed field"),
        (["v=TLSRPTv1; rua=ftp://x.test"], "no mailto: or https:"),
        (["v=TLSRPTv2; rua=mailto:a@d.test"], "no v=TLSRPTv1"),
    ],
)
def test_bad_records_give_no_report_and_say_why(texts: list[str], why: str) -> None:
    result = parse_records(texts)
    assert isinstance(result, NoTlsRpt) and why in result.reason, result


# -- the report builder --------------------------------------------------------------------

TLSA = ("3 1 1 " + "ab" * 32,)
STS = ("version: STSv1", "mode: enforce", "mx: *.mx.d.test", "max_age: 86400")


def rows() -> list[TlsResultCount]:
    fail = dict(sending_ip="192.0.2.1")
    return [
        TlsResultCount(DAY, "d.test", "tlsa", TLSA, SUCCESS, count=40),
        TlsResultCount(
            DAY,
            "d.test",
            "tlsa",
            TLSA,
            "validation-failure",
            "mx2.d.test",
            "192.0.2.1",
            "198.51.100.2",
            "tlsa-mismatch",
            3,
        ),
        TlsResultCount(DAY, "d.test", "sts", STS, SUCCESS, count=7),
        TlsResultCount(
            DAY,
            "d.test",
            "sts",
            STS,
            "certificate-host-mismatch",
            "a.mx.d.test",
            receiving_ip="198.51.100.9",
            reason_code="not-verified",
            count=2,
            **fail,
        ),
        TlsResultCount(
            DAY,
            "d.test",
            "sts",
            STS,
            "starttls-not-supported",
            "b.mx.d.test",
            "192.0.2.1",
            "198.51.100.10",
            "starttls-not-supported",
            1,
        ),
        # Other domains and days are not in d.test's report.
        TlsResultCount(DAY, "other.test", "no-policy-found", (), SUCCESS, count=99),
        TlsResultCount("2027-01-14", "d.test", "tlsa", TLSA, SUCCESS, count=99),
    ]


def test_report_from_recorded_rows() -> None:
    built = build_report(rows(), "D.test", DAY, SETTINGS)
    assert built.json == {
        "organization-name": "Example Sender Inc.",
        "date-range": {
            "start-datetime": "2027-01-15T00:00:00Z",
            "end-datetime": "2027-01-15T23:59:59Z",
        },
        "contact-info": "mailto:tls@sender.test",
        "report-id": "2027-01-15T00:00:00Z_d.test@sender.test",
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": list(STS),
                    "policy-domain": "d.test",
                    "mx-host": ["*.mx.d.test"],
                },
                "summary": {
                    "total-successful-session-count": 7,
                    "total-failure-session-count": 3,
                },
                "failure-details": [
                    {
                        "result-type": "certificate-host-mismatch",
                        "sending-mta-ip": "192.0.2.1",
                        "receiving-mx-hostname": "a.mx.d.test",
                        "receiving-ip": "198.51.100.9",
                        "failed-session-count": 2,
                        "failure-reason-code": "not-verified",
                    },
                    {
                        "result-type": "starttls-not-supported",
                        "sending-mta-ip": "192.0.2.1",
                        "receiving-mx-hostname": "b.mx.d.test",
                        "receiving-ip": "198.51.100.10",
                        "failed-session-count": 1,
                    },
                ],
            },
            {
                "policy": {
                    "policy-type": "tlsa",
                    "policy-string": list(TLSA),
                    "policy-domain": "d.test",
                },
                "summary": {
                    "total-successful-session-count": 40,
                    "total-failure-session-count": 3,
                },
                "failure-details": [
                    {
                        "result-type": "validation-failure",
                        "sending-mta-ip": "192.0.2.1",
                        "receiving-mx-hostname": "mx2.d.test",
                        "receiving-ip": "198.51.100.2",
                        "failed-session-count": 3,
                        "failure-reason-code": "tlsa-mismatch",
                    }
                ],
            },
        ],
    }
    assert (built.successes, built.failures) == (47, 6)
    # §5.1: sender!policy-domain!begin!end!unique-id.json.gz, epoch seconds.
    sender, domain, begin, end, rest = built.filename.split("!")
    assert (sender, domain, int(begin), int(end)) == ("sender.test", "d.test", T_DAY, T_DAY + 86399)
    assert rest.endswith(".json.gz") and len(rest) == len("0123456789ab.json.gz")
    assert json.loads(gzip.decompress(built.gzipped)) == built.json
    # The same counters give the same bytes (a resend is the same report).
    assert build_report(rows(), "d.test", DAY, SETTINGS).gzipped == built.gzipped


def test_no_policy_found_report_has_no_policy_string() -> None:
    built = build_report(rows(), "other.test", DAY, SETTINGS)
    (entry,) = built.json["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "other.test"}
    assert "failure-details" not in entry
    assert entry["summary"]["total-successful-session-count"] == 99


# -- the message -------------------------------------------------------------------------


def test_report_message_headers_and_parts() -> None:
    built = build_report(rows(), "d.test", DAY, SETTINGS)
    raw = report_message(
        built,
        sender="noreply-tlsrpt@sender.test",
        recipients=["tls@d.test", "copy@d.test"],
        submitter="sender.test",
        now=T_DAY + 3600 * 25,
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg: EmailMessage = email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[assignment]
    assert msg["TLS-Report-Domain"] == "d.test"
    assert msg["TLS-Report-Submitter"] == "sender.test"
    assert msg["Subject"] == (
        "Report Domain: d.test Submitter: sender.test "
        "Report-ID: <2027-01-15T00:00:00Z_d.test@sender.test>"
    )
    assert msg["From"] == "noreply-tlsrpt@sender.test"
    assert msg["To"] == "tls@d.test, copy@d.test"
    assert msg["TLS-Required"] == "No"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == built.filename
    data = attachment.get_payload(decode=True)
    assert isinstance(data, bytes) and json.loads(gzip.decompress(data)) == built.json


# -- the schedule --------------------------------------------------------------------------


def test_next_run() -> None:
    assert next_run(T_DAY, 1) == T_DAY + 3600
    assert next_run(T_DAY + 3600, 1) == T_DAY + 86400 + 3600  # strictly after
    assert next_run(T_DAY + 7200, 1) == T_DAY + 86400 + 3600
    assert next_run(T_DAY + 100, 0) == T_DAY + 86400


async def test_daily_reports_run_for_the_day_before_on_a_manual_clock() -> None:
    clock = FakeClock(T_DAY + 5 * 3600)  # 05:00 on the 15th; hour 3 has passed
    runs: list[str] = []
    prunes: list[str] = []
    sleeps: list[float] = []

    class Done(Exception):
        pass

    async def sleep(seconds: float) -> None:
        if len(sleeps) == 3:
            raise Done
        sleeps.append(seconds)
        clock.advance(seconds)

    async def run(day: str) -> None:
        runs.append(day)
        if day == "2027-01-16":
            raise RuntimeError("a bad day")  # logged; the next day still runs

    async def prune(day: str) -> None:
        prunes.append(day)

    daily = DailyReports(clock, 3, run, prune=prune, keep_days=7, sleep=sleep)
    with pytest.raises(Done):
        await daily.run_forever()
    assert sleeps == [22 * 3600, 86400, 86400]
    assert runs == ["2027-01-15", "2027-01-16", "2027-01-17"]
    assert prunes == ["2027-01-09", "2027-01-10", "2027-01-11"]


# -- the recorder --------------------------------------------------------------------------


def session(result: str, mode: str = "dane", **kw: Any) -> TlsSessionResult:
    fields: dict[str, Any] = dict(
        policy_domain="D.test.",
        mode=mode,
        result=result,
        mx_host="MX1.d.test",
        receiving_ip="198.51.100.2",
        policy_type="tlsa",
        policy_strings=TLSA,
    )
    fields.update(kw)
    return TlsSessionResult(**fields)


async def test_recorder_counts_and_flushes_to_the_store() -> None:
    store = MemoryStore()
    clock = FakeClock(T_DAY + 600)
    recorder = TlsReportRecorder(store.tls_reports, clock, local_address=lambda ip: "192.0.2.1")
    for _ in range(3):
        recorder.tls_session(session("dane-ee"))
    recorder.tls_session(session("dane-ee", mx_host="mx2.d.test", receiving_ip="198.51.100.3"))
    recorder.tls_session(session("tlsa-mismatch"))
    recorder.tls_session(session("tlsa-mismatch"))
    recorder.tls_session(session("plaintext", mode="none"))  # not reported
    recorder.tls_session(session("config-error", mode="verify"))  # not reported
    assert recorder.pending == 6
    await recorder.flush()
    assert recorder.pending == 0
    stored = await store.tls_reports.day(utc_day(clock.now()))
    assert stored == [
        # Successes: one counter, whatever MX took them.
        TlsResultCount(DAY, "d.test", "tlsa", TLSA, SUCCESS, count=4),
        TlsResultCount(
            DAY,
            "d.test",
            "tlsa",
            TLSA,
            "validation-failure",
            "mx1.d.test",
            "192.0.2.1",
            "198.51.100.2",
            "tlsa-mismatch",
            2,
        ),
    ]
    recorder.tls_session(session("dane-ee"))
    await recorder.stop()  # stop flushes what is left
    assert (await store.tls_reports.day(DAY))[0].count == 5


async def test_a_failed_flush_keeps_the_counts() -> None:
    store = MemoryStore()
    recorder = TlsReportRecorder(store.tls_reports, FakeClock(T_DAY))
    recorder.tls_session(session("dane-ee"))
    await store.close()  # the store refuses now
    await recorder.flush()
    assert recorder.pending == 1


# -- the config ---------------------------------------------------------------------------


def test_tls_reports_config() -> None:
    from pydantic import ValidationError

    from postillon.config.model import Config

    config = Config.model_validate(
        {"hostname": "mx.sender.test", "tls_reports": {"enabled": True, "from": "r@s.test"}}
    )
    assert config.tls_reports.sender_for(config.hostname) == "r@s.test"
    assert Config().tls_reports.enabled is False
    assert Config().tls_reports.sender_for("mx.sender.test") == "noreply-tlsrpt@mx.sender.test"
    for bad in ({"hour": 24}, {"from": "not an address"}, {"http_timeout": 0}, {"rua": "x"}):
        with pytest.raises(ValidationError):
            Config.model_validate({"tls_reports": bad})
