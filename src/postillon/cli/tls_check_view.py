"""``postillon tls check DOMAIN``: the rendering (``rich`` tables, or ``--json``).

The gathering is ``outbound.tls_check.check_domain`` through the transport
``build.smtp_transport`` makes from the configuration, so the view is what
delivery would see. Exit codes are :attr:`DomainCheck.exit_code`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from postillon.build import dns_resolver, open_queue_store, smtp_transport
from postillon.config.model import Config
from postillon.outbound.tls_check import DomainCheck, check_domain
from postillon.paths import queue_path
from postillon.queue.store import QueueStore

__all__ = ["gather", "run_check"]


def run_check(args: argparse.Namespace, config: Config) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        print(f"postillon: --port {args.port}: expected 1-65535", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(
            gather(config, args.domain, port=args.port, connect=not args.no_connect)
        )
    except ValueError as exc:  # unusable [dns] settings
        print(f"postillon: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render(result)
    return result.exit_code


async def gather(
    config: Config, domain: str, *, port: int | None = None, connect: bool = True
) -> DomainCheck:
    """The check of ``domain`` with ``config``'s resolver, table, DANE and MTA-STS
    (its cache in the queue store when there is a queue)."""
    store: QueueStore | None = None
    if config.outbound.mta_sts and (config.queue.store != "sqlite" or queue_path(config).exists()):
        store = open_queue_store(config)
    transport = smtp_transport(config, dns_resolver(config), store)
    try:
        return await check_domain(domain, transport, store=store, port=port, connect=connect)
    finally:
        await transport.close()
        if store is not None:
            await store.close()


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def render(result: DomainCheck) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"[bold]{escape(result.domain)}[/bold]")
    if result.error:
        console.print(f"[red]error:[/red] {escape(result.error)}")
        for note in result.notes:
            console.print(f"note: {escape(note)}")
        return
    secure = _yes(result.mx_secure) if result.trust_ad else "unknown ([dns] trust_ad is off)"
    kind = "implicit MX (the domain's own address)" if result.implicit_mx else "MX"
    console.print(f"{kind}; MX answer DNSSEC-secure: {secure}")
    for note in result.notes:
        console.print(f"note: {escape(note)}")

    hosts = Table(title="MX hosts")
    for col in ("pref", "host", "addresses", "address DNSSEC-secure"):
        hosts.add_column(col)
    for h in result.hosts:
        addr_secure = _yes(h.address_secure) if result.trust_ad else "unknown"
        hosts.add_row(str(h.preference), h.host, ", ".join(h.addresses), addr_secure)
    console.print(hosts)

    if result.rule is not None:
        rule = result.rule
        extra = f" match={rule['match']}" if rule["match"] else ""
        console.print(f"[[tls_policy]] rule: {rule['domain']} policy={rule['policy']}{extra}")
    else:
        console.print(f"[[tls_policy]] rule: none ([outbound] tls = {result.default})")

    if result.trust_ad:
        tlsa = Table(title="DANE (TLSA)")
        for col in ("host", "name", "DNSSEC", "records", "DANE"):
            tlsa.add_column(col)
        for h in result.hosts:
            records = "\n".join(
                f"{r['usage']} {r['selector']} {r['mtype']} {r['data'][:16]}… "
                + ("usable" if r["usable"] else "unusable")
                for r in h.tlsa
            )
            tlsa.add_row(h.host, h.tlsa_name or "-", h.tlsa_state or "-", records or "-", h.dane)
        console.print(tlsa)
    else:
        console.print("DANE: not consulted ([dns] trust_ad is off)")

    sts = result.sts
    if sts is None:
        console.print("MTA-STS: off ([outbound] mta_sts = false)")
    elif not sts.get("mode"):
        console.print("MTA-STS: no policy published")
    else:
        when = f"fetched {sts['fetched_at']}, expires {sts['expires_at']}"
        console.print(
            f"MTA-STS: mode {sts['mode']}, max_age {sts['max_age']}, mx {', '.join(sts['mx'])} "
            f"({sts['source']}: {when})"
        )
        for h in result.hosts:
            console.print(f"  {h.host}: {'matches' if h.sts_match else 'does not match'}")

    if result.connected:
        conns = Table(title="Test connections (QUIT before MAIL)")
        for col in ("host", "address", "STARTTLS", "TLS", "certificate", "check", "REQUIRETLS"):
            conns.add_column(col)
        for h in result.hosts:
            c = h.connection
            if c is None:
                conns.add_row(h.host, "-", "-", "-", "-", "not connected", "-")
                continue
            cert = ""
            if c.subject:
                cert = (
                    f"subject {c.subject}\nSANs {', '.join(c.sans) or '-'}\n"
                    f"issuer {c.issuer}\nexpires {c.not_after}"
                )
            check = c.check_result + (f": {c.check_reason}" if c.check_reason else "")
            if c.error and not c.check_result:
                check = f"error: {c.error}"
            conns.add_row(
                h.host,
                c.address,
                _yes(c.starttls) if c.ehlo else "-",
                f"{c.tls_version} {c.cipher}".strip() or "-",
                escape(cert) or "-",
                escape(check),
                _yes(c.requiretls) if c.ok else "-",
            )
        console.print(conns)

    console.print("[bold]Decision[/bold]")
    for h in result.hosts:
        colour = "green" if h.decision == "deliver" else "red"
        console.print(f"[{colour}]{escape(h.line)}[/{colour}]")
