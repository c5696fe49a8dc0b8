"""One day's DMARC aggregate reports: per policy domain, where to send, build, claim, send.

:meth:`DmarcReporter.report_day` reads the day's counters (every node's) and for each
policy domain in them:

1. looks up ``_dmarc.DOMAIN`` again and takes its ``rua=`` (a domain that stopped asking
   gets nothing); no record, several, or no usable ``mailto:``: no report, a log line;
2. verifies each external destination (§7.1, ``destinations.verify_external``) and
   drops those not authorised;
3. builds the report (``report.build_report``) and drops destinations whose ``!size``
   is smaller than it (§6.2);
4. claims (day, domain) in the store, so one node of a cluster (and one run after a
   restart) sends each report (``--dry-run`` neither claims nor sends);
5. mails it to the remaining destinations as one message through ``intake`` (the one
   way into the queue: the runner delivers and retries it like any mail, and intake
   DKIM-signs for the From domain when a key exists).

Nothing raises out of ``report_day`` for one domain's trouble: each outcome is a value.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from postillon.checks.dmarc_check import parse_record
from postillon.config.model import Config
from postillon.core.clock import Clock, SystemClock
from postillon.core.dmarc import DmarcResultCount
from postillon.core.envelope import MailParams, NewRecipient
from postillon.dmarcrpt.destinations import Destination, parse_rua, verify_external
from postillon.dmarcrpt.message import report_message
from postillon.dmarcrpt.report import BuiltReport, ReportSettings, build_report
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import IntakeError, IntakeTransaction
from postillon.queue.store import DmarcReportStore

__all__ = ["DmarcReporter", "DmarcReporterSettings", "DomainOutcome", "reporter_from_config"]

log = logging.getLogger("postillon.dmarcrpt")


class ReportIntake(Protocol):
    """What a report needs of intake (``intake.Intake`` is one)."""

    def begin(
        self, sender: str, params: MailParams, client: ClientInfo, source: str = ...
    ) -> IntakeTransaction: ...


@dataclass(frozen=True, slots=True)
class DmarcReporterSettings:
    report: ReportSettings
    sender: str
    owner: str = ""  # who claims a report (host:pid)
    max_report_size: int = 10 * 1024 * 1024


Status = Literal[
    "sent", "dry-run", "no-record", "no-destination", "already-sent", "dns-error", "failed"
]


@dataclass(slots=True)
class DomainOutcome:
    domain: str
    status: Status
    reason: str = ""
    report: BuiltReport | None = None
    destinations: list[Destination] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (uri, why)
    detail: str = ""  # "queued as Q..." / why not


class DmarcReporter:
    def __init__(
        self,
        store: DmarcReportStore,
        resolver: Resolver,
        intake: ReportIntake | None,
        settings: DmarcReporterSettings,
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
        outcomes = []
        for domain in domains:
            outcome = await self._one(
                day, domain, [r for r in rows if r.policy_domain == domain], dry_run
            )
            level = (
                logging.INFO
                if outcome.status in ("sent", "dry-run", "already-sent")
                else logging.WARNING
            )
            log.log(level, "DMARC report for %s (%s): %s %s", domain, day, outcome.status,
                    outcome.detail or outcome.reason)  # fmt: skip
            outcomes.append(outcome)
        return outcomes

    async def _rua(self, domain: str) -> tuple[str, ...] | DomainOutcome:
        name = f"_dmarc.{domain}"
        try:
            answer = await self._resolver.txt(name)
        except DnsNotFound:
            return DomainOutcome(domain, "no-record", f"no TXT record at {name}")
        except DnsTempError as exc:
            return DomainOutcome(domain, "dns-error", f"TXT lookup of {name} failed: {exc.reason}")
        texts = [r.text for r in answer.records if r.text.replace(" ", "").startswith("v=DMARC1")]
        record = parse_record(texts[0]) if len(texts) == 1 else None
        if record is None:
            return DomainOutcome(domain, "no-record", f"no single usable DMARC record at {name}")
        return record.rua

    async def _one(
        self, day: str, domain: str, rows: Sequence[DmarcResultCount], dry_run: bool
    ) -> DomainOutcome:
        rua = await self._rua(domain)
        if isinstance(rua, DomainOutcome):
            return rua
        outcome = DomainOutcome(domain, "dry-run")
        report = build_report(rows, domain, day, self.settings.report)
        outcome.report = report
        for dest in parse_rua(rua):
            why = dest.problem or await verify_external(self._resolver, domain, dest)
            limit = min(
                dest.max_size or self.settings.max_report_size, self.settings.max_report_size
            )
            if not why and len(report.gzipped) > limit:
                why = f"report of {len(report.gzipped)} octets is over the size limit {limit}"
            if why:
                outcome.dropped.append((dest.uri, why))
            else:
                outcome.destinations.append(dest)
        if not outcome.destinations:
            outcome.status, outcome.reason = "no-destination", "no rua= destination left"
            return outcome
        if dry_run:
            return outcome
        if not await self._store.claim(day, domain, self.settings.owner, self._clock.now()):
            outcome.status, outcome.reason = "already-sent", "claimed before (another node or run)"
            return outcome
        ok, outcome.detail = await self._mail(report, [d.address for d in outcome.destinations])
        outcome.status = "sent" if ok else "failed"
        return outcome

    async def _mail(self, report: BuiltReport, addresses: Sequence[str]) -> tuple[bool, str]:
        if self._intake is None:
            return False, "no intake to queue mail through"
        body = report_message(
            report,
            sender=self.settings.sender,
            recipients=addresses,
            submitter=self.settings.report.submitter,
            now=self._clock.now(),
        )
        tx = self._intake.begin(self.settings.sender, MailParams(), ClientInfo(), source="dmarcrpt")
        for address in addresses:
            tx.add_recipient(NewRecipient(address))
        try:
            tx.start_body()
            tx.write(body)
            queue_id = await tx.commit()
        except IntakeError as exc:
            return False, f"not queued: {exc.reply}"
        except Exception as exc:  # the store is down, the spool full: log, do not crash
            tx.abort()
            return False, f"not queued: {exc}"
        return True, f"queued as {queue_id}"


def reporter_from_config(
    config: Config, store: DmarcReportStore, resolver: Resolver, intake: ReportIntake | None
) -> DmarcReporter:
    """The reporter of ``[dmarc_reports]`` (the daily task and ``postillon dmarc report``)."""
    cfg = config.dmarc_reports
    sender = cfg.sender_for(config.hostname)
    settings = DmarcReporterSettings(
        ReportSettings(
            organization=cfg.organization or config.hostname,
            contact=cfg.contact or sender,
            submitter=sender.rpartition("@")[2].lower(),
        ),
        sender=sender,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        max_report_size=cfg.max_report_size,
    )
    return DmarcReporter(store, resolver, intake, settings, SystemClock())
