"""``postillon dmarc report --send-now|--dry-run [--day YYYY-MM-DD]``: DMARC aggregate reports.

Builds the RFC 7489 §7.2 aggregate reports of one UTC day (default: yesterday, the day
the daily run reports) from the evaluations recorded in the queue store, and mails them
as the server's daily run would (through intake into the queue, DKIM-signed when a key
exists, for the server's runner to deliver). ``--dry-run`` prints each domain's
destinations (and those dropped, with why: §7.1 verification, size limits) and its XML
report, and neither claims nor sends. A report already sent is not sent again.

Exit codes: 0 done, 1 a report could not be queued or the queue is unavailable, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from postillon.build import dns_resolver, open_queue_store
from postillon.cli.report_day import report_day
from postillon.config.model import Config
from postillon.core.clock import SystemClock
from postillon.dmarcrpt.reporter import DomainOutcome, reporter_from_config
from postillon.intake.intake import Intake
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import StoreError
from postillon.signing.signer import build_signer

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "dmarc",
        help="DMARC aggregate reports (RFC 7489)",
        description="DMARC aggregate reports about the mail this server received.",
    )
    dsub = d.add_subparsers(dest="dmarc_command", required=True, metavar="COMMAND")
    rep = dsub.add_parser(
        "report",
        help="build and send the DMARC aggregate reports of one day",
        description="Build the DMARC aggregate reports of one UTC day from the recorded "
        "evaluations and mail them to each domain's rua= destinations (external ones only "
        "when they agreed, RFC 7489 §7.1). Each report is sent once.",
    )
    what = rep.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--send-now", action="store_true", help="send now (not at [dmarc_reports] hour)"
    )
    what.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; send nothing"
    )
    rep.add_argument(
        "--day", metavar="YYYY-MM-DD", help="the UTC day to report (default: yesterday)"
    )


def run(args: argparse.Namespace, config: Config) -> int:
    day = report_day(args.day, config)
    if isinstance(day, int):
        return day
    if not config.dmarc_reports.enabled:
        print(
            "postillon: note: [dmarc_reports] enabled is false: no evaluations are being recorded",
            file=sys.stderr,
        )
    return asyncio.run(_report(config, day, dry_run=args.dry_run))


async def _report(config: Config, day: str, *, dry_run: bool) -> int:
    store = open_queue_store(config)
    try:
        intake = Intake(
            store,
            config.hostname,
            config.data_dir / "spool",
            clock=SystemClock(),
            signer=build_signer(config),
        )
        reporter = reporter_from_config(
            config, store.policy_state.dmarc_reports, dns_resolver(config), intake
        )
        outcomes = await reporter.report_day(day, dry_run=dry_run)
    except (StoreError, SchemaError) as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    if not outcomes:
        print(f"{day}: no DMARC evaluations recorded")
    for outcome in outcomes:
        _print(outcome, dry_run)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _print(outcome: DomainOutcome, dry_run: bool) -> None:
    report = outcome.report
    if report is None:
        print(f"{outcome.domain}: no report ({outcome.reason})")
        return
    print(
        f"{outcome.domain}: report {report.report_id} ({report.messages} messages),"
        f" file {report.filename}: {outcome.status}"
        + (f" ({outcome.detail or outcome.reason})" if outcome.detail or outcome.reason else "")
    )
    for dest in outcome.destinations:
        print(f"  {'would mail' if dry_run else 'to'}: mailto:{dest.address}")
    for uri, why in outcome.dropped:
        print(f"  dropped {uri}: {why}")
    if dry_run:
        print(report.xml.decode())
