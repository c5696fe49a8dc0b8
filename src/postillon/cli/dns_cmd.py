"""``postillon dns records|check DOMAIN``: the DNS records to publish, and whether they are.

``records`` prints MX, SPF, DKIM (from the keys), DMARC, MTA-STS and TLS-RPT records in
zone-file form, ready to paste. ``check`` looks them up through postillon's resolver (``[dns]
nameservers``) and prints a checklist. Exit codes: 0 nothing wrong (warnings allowed), 1
something missing or wrong, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rich.console import Console

from postillon.config.model import Config
from postillon.core.address import AddressError, domain_to_ascii
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.dnsrecords.check import CheckItem, check_plan
from postillon.dnsrecords.records import DomainPlan, plan_for, served_policy
from postillon.signing.keys import DkimKey, KeyStoreError, key_store_from_config

_NOT_LOCAL = (
    "{domain} is not a [[domain]] in the config: the MX brings its mail here, and it "
    "would be refused (add it, unless this host only sends for it)"
)
_MARKS = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "dns",
        help="the DNS records a domain should publish, and a check of them",
        description="Print the DNS records your domain needs for its mail to be delivered "
        "and trusted (MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT), or check what is published.",
    )
    dsub = d.add_subparsers(dest="dns_command", required=True, metavar="COMMAND")
    rec = dsub.add_parser(
        "records",
        help="print the records to publish, in zone-file form",
        description="Print the records for DOMAIN, ready to paste into its zone. The mail "
        "host is [hostname] from the config; DKIM records come from the keys "
        "(postillon dkim keygen).",
    )
    rec.add_argument("domain")
    rec.add_argument("--ttl", type=int, default=3600, help="TTL of the records (default 3600)")
    rec.add_argument(
        "--report-address",
        metavar="ADDRESS",
        help="where DMARC and TLS reports go (default postmaster@DOMAIN)",
    )
    chk = dsub.add_parser(
        "check",
        help="look the records up and report what is missing or wrong",
        description="Look up DOMAIN's records through the resolver in [dns] nameservers and "
        "print a checklist: ✓ fine, ! recommended but missing, ✗ missing or wrong. Exits "
        "with 1 when anything is ✗.",
    )
    chk.add_argument("domain")


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        domain = domain_to_ascii(args.domain.strip().rstrip(".")).lower()
    except (AddressError, UnicodeError, ValueError):
        domain = ""
    if "." not in domain:
        print(f"postillon: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    try:
        keys = key_store_from_config(config.dkim, config.data_dir).keys_for(domain)
    except KeyStoreError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    plan = plan_for(
        domain,
        config.hostname,
        keys,
        report_address=getattr(args, "report_address", None),
        smarthost=config.relay.smarthost,
        sts_policy=served_policy(config),
        sts_listen=config.mta_sts.listen,
        acme=config.tls.acme,
    )
    if args.dns_command == "records":
        if args.ttl < 0:
            print("postillon: --ttl must not be negative", file=sys.stderr)
            return 2
        sys.stdout.write(plan.zone_text(args.ttl))
        if domain not in config.local_domains:
            print(f"; note: {_NOT_LOCAL.format(domain=domain)}")
        return 0
    if args.dns_command == "check":
        return _check(plan, config, keys)
    raise AssertionError(args.dns_command)


def _check(plan: DomainPlan, config: Config, keys: tuple[DkimKey, ...]) -> int:
    resolver = DnsResolver(
        list(config.dns.nameservers) or None,
        timeout=config.dns.timeout,
        attempts=config.dns.attempts,
    )
    items = asyncio.run(check_plan(plan, keys, resolver))
    if plan.domain not in config.local_domains:
        items.insert(0, CheckItem("warn", "Local domain", _NOT_LOCAL.format(domain=plan.domain)))
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    asked = ", ".join(resolver.nameservers)
    console.print(f"[bold]{plan.domain}[/bold] (mail host {plan.hostname}), asked {asked}")
    for item in items:
        console.print(f" {_MARKS[item.status]} [bold]{item.title}[/bold]: {_escape(item)}")
    failed = sum(1 for i in items if i.status == "fail")
    warned = sum(1 for i in items if i.status == "warn")
    if failed:
        console.print(
            f"[red]{failed} problem(s)[/red], {warned} recommendation(s). "
            f"`postillon dns records {plan.domain}` prints what to publish."
        )
        return 1
    console.print(f"[green]All required records are in place[/green], {warned} recommendation(s).")
    return 0


def _escape(item: CheckItem) -> str:
    from rich.markup import escape

    return escape(item.detail)
