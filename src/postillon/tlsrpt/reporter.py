"""One day's TLS reports: per policy domain, find where to send, build, claim, send.

Design note
-----------
:meth:`TlsReporter.report_day` reads the day's counters (``store.tls_reports``,
every node's), and for each policy domain in them:

1. looks up ``_smtp._tls.DOMAIN`` TXT and parses it (``policy_record``); no record,
   two records or a malformed one: no report, one log line (RFC 8460 §3);
2. builds the report (``report.build_report``);
3. claims (day, domain) in the store: one node of a cluster, and one run after a
   restart, sends each report (``--dry-run`` neither claims nor sends);
4. sends it to every destination of ``rua=``: the ``mailto:`` addresses as one
   message through ``intake`` (the one way into the queue; the queue then retries
   like any mail, and intake DKIM-signs for the From domain when a key exists,
   §5.3), each ``https:`` URL by POST (§5.2: ``Content-Type:
   application/tlsrpt+gzip``, certificate verified, no redirects, a short
   timeout). A failed POST is logged and not retried (§5.4 leaves retries to the
   sender; this one keeps no state for them).

Nothing raises out of ``report_day`` for one domain's trouble: each domain's
outcome is a value (:class:`DomainOutcome`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from postillon.core.clock import Clock
from postillon.core.envelope import MailParams, NewRecipient
from postillon.core.tlsrpt import TlsResultCount
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import IntakeError, IntakeTransaction
from postillon.queue.store import TlsReportStore
from postillon.tlsrpt.https_post import post_report
from postillon.tlsrpt.message import report_message
from postillon.tlsrpt.policy_record import NoTlsRpt, TlsRptRecord, parse_records, record_name
from postillon.tlsrpt.report import BuiltReport, ReportSettings, build_report

__all__ = ["Delivery", "DomainOutcome", "ReportIntake", "ReporterSettings", "TlsReporter"]

log = logging.getLogger("postillon.tlsrpt")


class ReportIntake(Protocol):
    """What a report needs of intake (``intake.Intake`` is one)."""

    def begin(
        self, sender: str, params: MailParams, client: ClientInfo, source: str = ...
    ) -> IntakeTransaction: ...


@dataclass(frozen=True, slots=True)
class ReporterSettings:
    report: ReportSettings
    sender: str  # From: and the envelope sender of report mail
    http_timeout: float = 30.0
    ca_file: str | None = None  # trust for https: collectors, else the system CAs
    owner: str = ""  # who claims a report (host:pid), for the claims table


@dataclass(frozen=True, slots=True)
class Delivery:
    destination: str  # mailto:ADDR or the URL
    ok: bool
    detail: str  # "queued as Q..." / "HTTP 200" / why not


@dataclass(slots=True)
class DomainOutcome:
    domain: str
    status: Literal["sent", "dry-run", "no-record", "bad-record", "already-sent", "dns-error"]
    reason: str = ""
    report: BuiltReport | None = None
    record: TlsRptRecord | None = None
    deliveries: list[Delivery] = field(default_factory=list)


class TlsReporter:
    def __init__(
        self,
        store: TlsReportStore,
        resolver: Resolver,
        intake: ReportIntake | None,
        settings: ReporterSettings,
        clock: Clock,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._intake = intake
        self.settings = settings
        self._clock = clock

    async def report_day(self, day: str, *, dry_run: bool = False) -> list[DomainOutcome]:
        rows = await self._store.day(day)
        domains = sorted({r.policy_domain for r in rows})
        return [await self._one(day, domain, rows, dry_run) for domain in domains]

    async def _one(
        self, day: str, domain: str, rows: Sequence[TlsResultCount], dry_run: bool
    ) -> DomainOutcome:
        record = await self._record(domain)
        if isinstance(record, DomainOutcome):
            # Most domains publish no record: that is no news. A broken record or DNS
            # trouble is worth the operator's eye (and the domain's, if they ask).
            log.log(
                logging.INFO if record.status == "no-record" else logging.WARNING,
                "TLS report for %s (%s) not sent: %s",
                domain,
                day,
                record.reason,
            )
            return record
        report = build_report(rows, domain, day, self.settings.report)
        outcome = DomainOutcome(domain, "dry-run", report=report, record=record)
        if dry_run:
            return outcome
        if not await self._store.claim(day, domain, self.settings.owner, self._clock.now()):
            outcome.status, outcome.reason = "already-sent", "claimed before (another node or run)"
            log.info("TLS report for %s (%s): already sent", domain, day)
            return outcome
        outcome.status = "sent"
        if record.mailto:
            outcome.deliveries.append(await self._mail(report, record.mailto))
        for url in record.https:
            outcome.deliveries.append(await self._post(report, url))
        for d in outcome.deliveries:
            log.log(
                logging.INFO if d.ok else logging.WARNING,
                "TLS report %s for %s (%s) to %s: %s",
                report.report_id,
                domain,
                day,
                d.destination,
                d.detail,
            )
        return outcome

    async def _record(self, domain: str) -> TlsRptRecord | DomainOutcome:
        name = record_name(domain)
        try:
            answer = await self._resolver.txt(name)
        except DnsNotFound:
            return DomainOutcome(domain, "no-record", f"no TXT record at {name}")
        except DnsTempError as exc:
            return DomainOutcome(domain, "dns-error", f"TXT lookup of {name} failed: {exc.reason}")
        parsed = parse_records([r.text for r in answer.records])
        if isinstance(parsed, NoTlsRpt):
            return DomainOutcome(domain, "bad-record", f"{name}: {parsed.reason}")
        return parsed

    async def _mail(self, report: BuiltReport, addresses: Sequence[str]) -> Delivery:
        where = ", ".join(f"mailto:{a}" for a in addresses)
        if self._intake is None:
            return Delivery(where, False, "no intake to queue mail through")
        body = report_message(
            report,
            sender=self.settings.sender,
            recipients=addresses,
            submitter=self.settings.report.submitter,
            now=self._clock.now(),
        )
        tx = self._intake.begin(self.settings.sender, MailParams(), ClientInfo(), source="tlsrpt")
        for address in addresses:
            tx.add_recipient(NewRecipient(address))
        try:
            tx.start_body()
            tx.write(body)
            queue_id = await tx.commit()
        except IntakeError as exc:
            return Delivery(where, False, f"not queued: {exc.reply}")
        except Exception as exc:  # the store is down, the spool full: log, do not crash
            tx.abort()
            return Delivery(where, False, f"not queued: {exc}")
        return Delivery(where, True, f"queued as {queue_id}")

    async def _post(self, report: BuiltReport, url: str) -> Delivery:
        ok, detail = await post_report(
            url,
            report.gzipped,
            resolver=self._resolver,
            timeout=self.settings.http_timeout,
            ca_file=self.settings.ca_file,
        )
        return Delivery(url, ok, detail)
