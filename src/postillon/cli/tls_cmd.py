"""``postillon tls ...``: outbound TLS for operators.

``tls report --send-now [--day YYYY-MM-DD] [--dry-run]`` builds the RFC 8460 TLS
reports of one UTC day (default: yesterday, the day the daily run reports) from
the counters in the queue store, and sends them as the server's daily run would
(mail through intake into the queue, for the server's runner to deliver; HTTPS by
POST). ``--dry-run`` prints what it would send - each domain's destinations and
its JSON report - and neither claims nor sends. A report already sent (by the
daily run, another node, or an earlier ``--send-now``) is not sent again.

Exit codes: 0 done (a domain without a TLSRPT record is not an error), 1 a
report could not be sent or the queue is unavailable, 2 bad input.

``tls check DOMAIN [--json] [--no-connect] [--port N]`` shows which TLS policy
applies to mail for DOMAIN and why, as the server's own delivery sees it (same
resolver, table, DANE and MTA-STS settings, the MTA-STS cache in the queue
store): gathered by ``outbound.tls_check``, rendered here. Exit codes: 0 every
MX host would get mail, 1 some host is refused (or unreachable while others
are not), 2 none can be reached (DNS failure, null MX, no address).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from postillon.build import dns_resolver, open_queue_store, tls_reporter
from postillon.cli import tls_renew
from postillon.cli.report_day import report_day
from postillon.config.model import Config
from postillon.core.clock import SystemClock
from postillon.intake.intake import Intake
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import StoreError
from postillon.signing.signer import build_signer
from postillon.tlsrpt.reporter import DomainOutcome

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "tls",
        help="TLS: reports (RFC 8460), policy checks, ACME certificate renewal",
        description="TLS for operators: outbound TLS reports and policy checks, and "
        "renewing the server's ACME certificate.",
    )
    tsub = t.add_subparsers(dest="tls_command", required=True, metavar="COMMAND")
    rep = tsub.add_parser(
        "report",
        help="build and send the TLS reports (RFC 8460) of one day",
        description="Build the TLS reports of one UTC day from the recorded outbound "
        "sessions and send them to each domain's _smtp._tls rua= destinations "
        "(mail through the queue, HTTPS POST). Each report is sent once.",
    )
    what = rep.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--send-now", action="store_true", help="send now (not at [tls_reports] hour)"
    )
    what.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; send nothing"
    )
    rep.add_argument(
        "--day", metavar="YYYY-MM-DD", help="the UTC day to report (default: yesterday)"
    )
    chk = tsub.add_parser(
        "check",
        help="show which TLS policy applies to a destination domain, and why",
        description="Resolve DOMAIN's MX hosts as delivery does, show the [[tls_policy]] "
        "rule, TLSA records, the MTA-STS policy, a test connection to each MX (QUIT "
        "before MAIL) and the resulting decision per host.",
    )
    chk.add_argument("domain", metavar="DOMAIN")
    chk.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    chk.add_argument(
        "--no-connect", action="store_true", help="no test connections: DNS and policy only"
    )
    chk.add_argument("--port", type=int, help="SMTP port (default: [outbound] port)")
    tls_renew.add_parser(tsub)


def run(args: argparse.Namespace, config: Config) -> int:
    if args.tls_command == "renew":
        return tls_renew.run_renew(args, config)
    if args.tls_command == "check":
        from postillon.cli.tls_check_view import run_check

        return run_check(args, config)
    if not (args.send_now or args.dry_run):
        print("postillon: tls report: give --send-now, or --dry-run to look first", file=sys.stderr)
        return 2
    day = report_day(args.day, config)
    if isinstance(day, int):
        return day
    if not config.tls_reports.enabled:
        print(
            "postillon: note: [tls_reports] enabled is false: no sessions are being recorded",
            file=sys.stderr,
        )
    return asyncio.run(_report(config, day, dry_run=args.dry_run))


async def _report(config: Config, day: str, *, dry_run: bool) -> int:
    store = open_queue_store(config)
    try:
        # The one way into the queue, with the server's DKIM keys: report mail is
        # signed for its From domain as any local message (RFC 8460 §5.3).
        intake = Intake(
            store,
            config.hostname,
            config.data_dir / "spool",
            clock=SystemClock(),
            signer=build_signer(config),
        )
        reporter = tls_reporter(config, store, dns_resolver(config), intake)
        outcomes = await reporter.report_day(day, dry_run=dry_run)
    except (StoreError, SchemaError) as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    if not outcomes:
        print(f"{day}: no outbound sessions recorded")
    failed = False
    for outcome in outcomes:
        _print(outcome, dry_run)
        failed |= any(not d.ok for d in outcome.deliveries)
    return 1 if failed else 0


def _print(outcome: DomainOutcome, dry_run: bool) -> None:
    report = outcome.report
    if report is None:
        print(f"{outcome.domain}: no report ({outcome.reason})")
        return
    counts = f"{report.successes} successful, {report.failures} failed sessions"
    print(f"{outcome.domain}: report {report.report_id} ({counts}), file {report.filename}")
    if outcome.status == "already-sent":
        print(f"  not sent: {outcome.reason}")
    for delivery in outcome.deliveries:
        mark = "sent" if delivery.ok else "FAILED"
        print(f"  {mark}: {delivery.destination}: {delivery.detail}")
    if dry_run and outcome.record is not None:
        for address in outcome.record.mailto:
            print(f"  would mail: mailto:{address}")
        for url in outcome.record.https:
            print(f"  would POST: {url}")
        print(json.dumps(report.json, indent=2))
