"""One day's TLS counters of one policy domain → the RFC 8460 §4 report. Pure.

The JSON (§4.4), one entry in ``policies`` per distinct policy seen that day
(policy type and policy strings: a TLSA rollover mid-day gives two), each with
its ``summary`` (§4.4 ``total-successful-session-count`` and
``total-failure-session-count``) and ``failure-details`` grouped by result type,
sending IP, receiving MX and IP, with postillon's own label as
``failure-reason-code``. ``date-range`` is the UTC day (§4.1). The report is
gzipped (§5.1 ``application/tlsrpt+gzip``) and named
``sender!policy-domain!begin!end!unique-id.json.gz`` (§5.1; begin and end in
seconds since the epoch).
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from postillon.core.tlsrpt import TlsResultCount

__all__ = ["BuiltReport", "ReportSettings", "build_report", "day_range"]

CONTENT_TYPE: Final = "application/tlsrpt+gzip"


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """Who reports (``[tls_reports]``): ``organization`` (§4.4 organization-name),
    ``contact`` (§4.4 contact-info), ``submitter`` (the domain of the reporting
    MTA: §5.1's file name and §5.3's TLS-Report-Submitter)."""

    organization: str
    contact: str
    submitter: str


@dataclass(frozen=True, slots=True)
class BuiltReport:
    domain: str
    day: str
    report_id: str
    json: dict[str, Any]
    gzipped: bytes
    filename: str
    successes: int
    failures: int


def day_range(day: str) -> tuple[int, int]:
    """(first second, last second) of the UTC ``day`` (``YYYY-MM-DD``)."""
    begin = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    return begin, begin + 86399


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def build_report(
    rows: Sequence[TlsResultCount], domain: str, day: str, settings: ReportSettings
) -> BuiltReport:
    """The report of ``domain`` for ``day`` from its counters (rows of other days or
    domains are ignored)."""
    domain = domain.lower()
    begin, end = day_range(day)
    # Deterministic: the same report resent (e.g. after a crash) has the same id.
    report_id = f"{day}T00:00:00Z_{domain}@{settings.submitter}"
    mine = [r for r in rows if r.day == day and r.policy_domain.lower() == domain]
    policies: dict[tuple[str, tuple[str, ...]], list[TlsResultCount]] = {}
    for row in mine:
        policies.setdefault((row.policy_type, row.policy_strings), []).append(row)
    entries = [_policy_entry(domain, kind, strings, rs) for (kind, strings), rs in policies.items()]
    entries.sort(key=lambda e: (e["policy"]["policy-type"], e["policy"].get("policy-string", [])))
    report = {
        "organization-name": settings.organization,
        "date-range": {"start-datetime": _utc(begin), "end-datetime": _utc(end)},
        "contact-info": settings.contact,
        "report-id": report_id,
        "policies": entries,
    }
    data = json.dumps(report, indent=1, sort_keys=False).encode()
    unique = hashlib.sha256(report_id.encode()).hexdigest()[:12]
    filename = f"{settings.submitter}!{domain}!{begin}!{end}!{unique}.json.gz"
    successes = sum(r.count for r in mine if r.is_success)
    return BuiltReport(
        domain,
        day,
        report_id,
        report,
        # mtime=0: the same report gzips to the same bytes.
        gzip.compress(data, mtime=0),
        filename,
        successes,
        sum(r.count for r in mine) - successes,
    )


def _policy_entry(
    domain: str, kind: str, strings: tuple[str, ...], rows: Sequence[TlsResultCount]
) -> dict[str, Any]:
    policy: dict[str, Any] = {"policy-type": kind}
    if strings:
        policy["policy-string"] = list(strings)
    policy["policy-domain"] = domain
    if kind == "sts":  # §4.4 mx-host: the policy's MX patterns
        mx = [s.split(":", 1)[1].strip() for s in strings if s.lower().startswith("mx:")]
        if mx:
            policy["mx-host"] = mx
    details: dict[tuple[str, str, str, str, str], int] = {}
    for r in rows:
        if not r.is_success:
            k = (r.result, r.sending_ip, r.mx_host, r.receiving_ip, r.reason_code)
            details[k] = details.get(k, 0) + r.count
    successes = sum(r.count for r in rows if r.is_success)
    entry: dict[str, Any] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": successes,
            "total-failure-session-count": sum(details.values()),
        },
    }
    if details:
        entry["failure-details"] = [
            _detail(k, n) for k, n in sorted(details.items(), key=lambda kv: kv[0])
        ]
    return entry


def _detail(key: tuple[str, str, str, str, str], count: int) -> dict[str, Any]:
    result, sending_ip, mx_host, receiving_ip, code = key
    detail: dict[str, Any] = {"result-type": result}
    if sending_ip:
        detail["sending-mta-ip"] = sending_ip
    if mx_host:
        detail["receiving-mx-hostname"] = mx_host
    if receiving_ip:
        detail["receiving-ip"] = receiving_ip
    detail["failed-session-count"] = count
    if code and code != result:
        detail["failure-reason-code"] = code
    return detail
