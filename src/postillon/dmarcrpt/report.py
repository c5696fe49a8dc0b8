"""One day's DMARC aggregate report of one policy domain (RFC 7489 §7.2, Appendix C).

Pure: counters in, the XML document, its gzip and its file name out. The report covers
the UTC day (``date_range`` from 00:00:00 to 23:59:59). ``report_id`` is derived from
the day, the domain and the submitter, so a report built twice (a dry run, then the
send) has the same id. ``policy_published`` is the policy seen in the day's last
evaluation (a record that changed mid-day shows its latest form).
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from postillon.core.dmarc import DmarcResultCount

__all__ = ["BuiltReport", "ReportSettings", "build_report"]


@dataclass(frozen=True, slots=True)
class ReportSettings:
    organization: str  # <org_name>
    contact: str  # <email>
    submitter: str  # the report's receiver domain (file name, Subject)


@dataclass(frozen=True, slots=True)
class BuiltReport:
    domain: str
    day: str
    report_id: str
    xml: bytes
    gzipped: bytes
    filename: str
    messages: int  # evaluations counted
    begin: int
    end: int


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def build_report(
    rows: Sequence[DmarcResultCount], domain: str, day: str, settings: ReportSettings
) -> BuiltReport:
    begin = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    end = begin + 86399
    digest = hashlib.sha256(f"{day}|{domain}|{settings.submitter}".encode()).hexdigest()[:16]
    report_id = f"{day.replace('-', '')}.{digest}@{settings.submitter}"
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", settings.organization)
    _sub(meta, "email", settings.contact)
    _sub(meta, "report_id", report_id)
    dates = _sub(meta, "date_range")
    _sub(dates, "begin", begin)
    _sub(dates, "end", end)
    published = rows[-1].published if rows else None
    pub = _sub(root, "policy_published")
    _sub(pub, "domain", domain)
    if published is not None:
        _sub(pub, "adkim", published.adkim)
        _sub(pub, "aspf", published.aspf)
        _sub(pub, "p", published.p)
        _sub(pub, "sp", published.sp)
        _sub(pub, "pct", published.pct)
    for r in rows:
        record = _sub(root, "record")
        row = _sub(record, "row")
        _sub(row, "source_ip", r.source_ip)
        _sub(row, "count", r.count)
        evaluated = _sub(row, "policy_evaluated")
        _sub(evaluated, "disposition", r.disposition)
        _sub(evaluated, "dkim", r.dkim)
        _sub(evaluated, "spf", r.spf)
        ids = _sub(record, "identifiers")
        if r.envelope_to:
            _sub(ids, "envelope_to", r.envelope_to)
        if r.envelope_from:
            _sub(ids, "envelope_from", r.envelope_from)
        _sub(ids, "header_from", r.header_from)
        auth = _sub(record, "auth_results")
        for d in r.dkim_results:
            dkim = _sub(auth, "dkim")
            _sub(dkim, "domain", d.domain)
            if d.detail:
                _sub(dkim, "selector", d.detail)
            _sub(dkim, "result", d.result)
        spf_results = r.spf_results or ()
        for s in spf_results:
            spf = _sub(auth, "spf")
            _sub(spf, "domain", s.domain)
            _sub(spf, "scope", s.detail or "mfrom")
            _sub(spf, "result", s.result)
        if not spf_results:  # SPFAuthResultType is required (minOccurs=1)
            spf = _sub(auth, "spf")
            _sub(spf, "domain", r.envelope_from or r.header_from)
            _sub(spf, "result", "none")
    xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    # mtime=0: the same report gzips to the same bytes.
    gzipped = gzip.compress(xml, mtime=0)
    filename = f"{settings.submitter}!{domain}!{begin}!{end}.xml.gz"  # §7.2.1.1
    messages = sum(r.count for r in rows)
    return BuiltReport(domain, day, report_id, xml, gzipped, filename, messages, begin, end)
