"""Look up what a domain publishes and say, item by item, what is missing or wrong.

Every lookup goes through postillon's :class:`~postillon.dns.resolver.Resolver` (so
``[dns] nameservers`` applies, and tests use the loopback DNS fixture). A temporary DNS failure
is reported as a failure of that item, with the reason, never as "missing".
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from postillon.core.sts import PolicyError, parse_policy
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver, TxtRecord
from postillon.dns.sts_fetch import PolicyFetchError, fetch_policy, policy_url
from postillon.dnsrecords.records import DomainPlan, mta_sts_id
from postillon.signing.keys import DkimKey

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class CheckItem:
    status: Status
    title: str
    detail: str


async def _txt_records(resolver: Resolver, name: str, prefix: str) -> list[str]:
    """The TXT records at ``name`` whose text starts with ``prefix`` (e.g. ``v=spf1``),
    case-insensitively and followed by a space, ``;`` or the end. [] if none or no name."""
    try:
        answer = await resolver.txt(name)
    except DnsNotFound:
        return []
    pattern = re.compile(re.escape(prefix) + r"(?:[\s;]|$)", re.IGNORECASE)
    texts = [_text(r) for r in answer.records]
    return [t for t in texts if pattern.match(t.strip())]


def _text(record: TxtRecord) -> str:
    return record.text


def _tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` tag lists (RFC 6376 §3.2, RFC 7489 §6.4), keys lower-cased."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    return tags


async def check_plan(
    plan: DomainPlan, keys: tuple[DkimKey, ...], resolver: Resolver
) -> list[CheckItem]:
    """The checklist for ``plan.domain``, in the order ``dns records`` prints the records."""
    items: list[CheckItem] = []

    async def run(title: str, check: Callable[[], Awaitable[CheckItem | list[CheckItem]]]) -> None:
        try:
            result = await check()
        except DnsTempError as exc:
            result = CheckItem("fail", title, f"DNS lookup failed ({exc}); try again later")
        items.extend(result if isinstance(result, list) else [result])

    domain, host = plan.domain, plan.hostname

    async def mx() -> CheckItem:
        try:
            answer = await resolver.mx(domain)
        except DnsNotFound as exc:
            what = "the domain does not exist" if exc.nxdomain else "no MX record"
            return CheckItem("fail", "MX", f"{what}; publish: {domain}. IN MX 10 {host}.")
        if any(r.is_null for r in answer.records):
            return CheckItem("fail", "MX", "null MX (RFC 7505): the domain says it takes no mail")
        hosts = [r.exchange for r in sorted(answer.records, key=lambda r: r.preference)]
        if host in hosts:
            return CheckItem("ok", "MX", f"{domain} → {', '.join(hosts)}")
        return CheckItem(
            "fail", "MX", f"MX points to {', '.join(hosts)}, not to this host ({host})"
        )

    async def address() -> list[CheckItem]:
        try:
            answer = await resolver.addresses(host)
        except DnsNotFound:
            return [CheckItem("fail", "Mail host address", f"{host} has no A or AAAA record")]
        ips = list(answer.records)
        out = [CheckItem("ok", "Mail host address", f"{host} → {', '.join(ips)}")]
        for ip in ips:
            try:
                names = (await resolver.ptr(ip)).records
            except DnsNotFound:
                names = ()
            except DnsTempError as exc:
                # Not ours to fix and not fatal: the address itself was found.
                out.append(CheckItem("warn", "Reverse DNS", f"{ip}: lookup failed ({exc})"))
                continue
            if host in names:
                out.append(CheckItem("ok", "Reverse DNS", f"{ip} → {host}"))
            else:
                shown = ", ".join(names) if names else "no PTR record"
                out.append(
                    CheckItem(
                        "warn",
                        "Reverse DNS",
                        f"{ip} → {shown}; large providers expect {host} "
                        "(ask whoever runs the address to set the PTR)",
                    )
                )
        return out

    async def spf() -> CheckItem:
        found = await _txt_records(resolver, domain, "v=spf1")
        if not found:
            return CheckItem(
                "fail", "SPF", f'no SPF record; publish: {domain}. IN TXT "v=spf1 mx ~all"'
            )
        if len(found) > 1:
            return CheckItem("fail", "SPF", f"{len(found)} SPF records: a permerror (RFC 7208 4.5)")
        text = found[0]
        terms = text.lower().split()[1:]
        if "+all" in terms or "all" in terms:
            return CheckItem("fail", "SPF", f"{text!r} lets anyone send as {domain} (+all)")
        if any(
            t.lstrip("+~?-") in ("mx", "a")
            or t.startswith(("include:", "redirect=", "ip4:", "ip6:", "mx:", "a:"))
            for t in terms
        ):
            return CheckItem("ok", "SPF", text)
        return CheckItem("warn", "SPF", f"{text!r} names no sending host (mx, a, ip4:, include:)")

    async def helo_spf() -> CheckItem:
        found = await _txt_records(resolver, host, "v=spf1")
        if found:
            return CheckItem("ok", "SPF for HELO name", f"{host}: {found[0]}")
        return CheckItem(
            "warn", "SPF for HELO name", f'recommended: {host}. IN TXT "v=spf1 a -all"'
        )

    async def dkim() -> list[CheckItem]:
        if not keys:
            return [
                CheckItem(
                    "fail", "DKIM", f"no signing key for {domain}: postillon dkim keygen {domain}"
                )
            ]
        out = []
        for key in keys:
            title = f"DKIM {key.selector} ({key.algorithm})"
            found = await _txt_records(resolver, key.dns_name, "v=DKIM1")
            if not found:
                # v= is optional in key records (RFC 6376 3.6.1): accept any with p=.
                try:
                    found = [
                        r.text for r in (await resolver.txt(key.dns_name)).records if "p=" in r.text
                    ]
                except DnsNotFound:
                    found = []
            if not found:
                out.append(CheckItem("fail", title, f"no key record at {key.dns_name}"))
                continue
            tags = _tags(found[0])
            published = re.sub(r"\s+", "", tags.get("p", ""))
            if not published:
                out.append(CheckItem("fail", title, f"{key.dns_name}: p= is empty (key revoked)"))
            elif published != key.public_key_base64():
                out.append(
                    CheckItem(
                        "fail",
                        title,
                        f"{key.dns_name} publishes a different key; publish: {key.zone_record()}",
                    )
                )
            elif tags.get("k", "rsa").lower() != key.algorithm:
                out.append(
                    CheckItem(
                        "fail",
                        title,
                        f"{key.dns_name}: k={tags.get('k')}, expected {key.algorithm}",
                    )
                )
            else:
                out.append(CheckItem("ok", title, f"{key.dns_name} matches the key"))
        return out

    async def dmarc() -> CheckItem:
        name = f"_dmarc.{domain}"
        found = await _txt_records(resolver, name, "v=DMARC1")
        if not found:
            return CheckItem("fail", "DMARC", f"no DMARC record at {name}")
        if len(found) > 1:
            return CheckItem(
                "fail",
                "DMARC",
                f"{len(found)} DMARC records at {name} (RFC 7489 6.6.3: none applies)",
            )
        policy = _tags(found[0]).get("p", "").lower()
        if policy not in ("none", "quarantine", "reject"):
            return CheckItem(
                "fail", "DMARC", f"{found[0]!r}: p= must be none, quarantine or reject"
            )
        note = (
            " (reports only; move to quarantine/reject when they look clean)"
            if policy == "none"
            else ""
        )
        return CheckItem("ok", "DMARC", found[0] + note)

    async def mta_sts() -> list[CheckItem]:
        """The _mta-sts record and, when it is well-formed, the policy it announces
        (also under a stale id: senders that never saw the policy still fetch it)."""
        record = await mta_sts_record()
        stale = record.status == "warn" and "the policy postillon serves has id=" in record.detail
        return [record, await mta_sts_policy()] if record.status == "ok" or stale else [record]

    async def mta_sts_record() -> CheckItem:
        name = f"_mta-sts.{domain}"
        found = await _txt_records(resolver, name, "v=STSv1")
        if not found:
            return CheckItem(
                "warn", "MTA-STS", f"recommended: a TXT record at {name} and a policy file"
            )
        if len(found) > 1:
            return CheckItem(
                "fail", "MTA-STS", f"{len(found)} records at {name} (RFC 8461 3.1: none applies)"
            )
        ident = _tags(found[0]).get("id", "")
        if not re.fullmatch(r"[A-Za-z0-9]{1,32}", ident):
            return CheckItem(
                "fail", "MTA-STS", f"{found[0]!r}: id= must be 1-32 letters and digits"
            )
        expected = mta_sts_id(plan.mta_sts_policy)
        if plan.mta_sts_listen is not None and ident != expected:
            # Senders fetch the policy again only when the id changes (RFC 8461 3.1):
            # with a stale id they keep the old policy until its max_age runs out.
            return CheckItem(
                "warn",
                "MTA-STS",
                f"{found[0]!r}: the policy postillon serves has id={expected}; publish "
                f'{name}. IN TXT "v=STSv1; id={expected}" so senders fetch it',
            )
        return CheckItem("ok", "MTA-STS", found[0])

    async def mta_sts_policy() -> CheckItem:
        """The policy file the _mta-sts record announces: fetched as a sender would, and
        checked against the domain's MX hosts."""
        url = policy_url(domain)
        try:
            policy = parse_policy(await fetch_policy(domain, resolver))
        except (PolicyFetchError, PolicyError) as exc:
            return CheckItem(
                "fail", "MTA-STS policy", f"{url}: {exc}; senders apply no MTA-STS policy"
            )
        try:
            hosts = [r.exchange for r in (await resolver.mx(domain)).records if not r.is_null]
        except (DnsNotFound, DnsTempError):  # the MX item reports it; check this host
            hosts = []
        uncovered = [h for h in hosts or [host] if not policy.covers(h)]
        summary = f"mode {policy.mode}, mx {', '.join(policy.mx) or '-'}, max_age {policy.max_age}"
        if uncovered and policy.mode == "enforce":
            return CheckItem(
                "fail",
                "MTA-STS policy",
                f"{summary}: {', '.join(uncovered)} not listed; senders that enforce "
                "MTA-STS will not deliver there (RFC 8461 4.1)",
            )
        if uncovered:
            return CheckItem(
                "warn", "MTA-STS policy", f"{summary}: {', '.join(uncovered)} not listed"
            )
        if policy.mode == "none":
            return CheckItem("warn", "MTA-STS policy", f"{summary}: the policy is switched off")
        return CheckItem("ok", "MTA-STS policy", summary)

    async def tls_rpt() -> CheckItem:
        name = f"_smtp._tls.{domain}"
        found = await _txt_records(resolver, name, "v=TLSRPTv1")
        if not found:
            return CheckItem("warn", "TLS-RPT", f"recommended: a TXT record at {name}")
        rua = _tags(found[0]).get("rua", "")
        if not rua.startswith(("mailto:", "https:")):
            return CheckItem(
                "fail", "TLS-RPT", f"{found[0]!r}: rua= must be mailto: or https: (RFC 8460 3)"
            )
        return CheckItem("ok", "TLS-RPT", found[0])

    await run("MX", mx)
    await run("Mail host address", address)
    await run("SPF", spf)
    if host != domain:
        await run("SPF for HELO name", helo_spf)
    await run("DKIM", dkim)
    await run("DMARC", dmarc)
    await run("MTA-STS", mta_sts)
    await run("TLS-RPT", tls_rpt)
    return items
