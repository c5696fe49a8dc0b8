"""DMARC (RFC 7489) on top of the SPF and DKIM results.

Pure parts: the organisational domain (public suffix list shipped by the
``publicsuffixlist`` package, RFC 7489 §3.2), record parsing (§6.3),
identifier alignment (§3.1) and the evaluation (§6.6.2). The one impure part,
:func:`discover_policy`, asks postillon's resolver for ``_dmarc.<domain>``
and then ``_dmarc.<organisational domain>`` (§6.6.3).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

from publicsuffixlist import PublicSuffixList

from postillon.checks.authresults import MethodResult
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, Resolver, TxtRecord

Policy = Literal["none", "quarantine", "reject"]
_POLICIES = ("none", "quarantine", "reject")


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registrable domain (public suffix + one label)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """§3.1: strict = the same name; relaxed = the same organisational domain."""
    a = identifier.lower().rstrip(".")
    b = from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    policy: Policy
    subdomain_policy: Policy
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    # rua= (§6.3): where aggregate reports go, the URIs as written ("mailto:a@b!10m").
    rua: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1024)
def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record, or None when it is not one (§6.3: v=DMARC1 first, p= required)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    first = text.split(";", 1)[0].replace(" ", "")
    if first != "v=DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        # §6.6.3: an invalid p= with a valid rua= is treated as p=none; without, no record.
        if "rua" not in tags:
            return None
        policy = "none"
    sub = tags.get("sp", policy).lower()
    pct_text = tags.get("pct", "100")
    return DmarcRecord(
        policy=policy,  # type: ignore[arg-type]
        subdomain_policy=sub if sub in _POLICIES else policy,  # type: ignore[arg-type]
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100,
        rua=tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip()),
    )


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """What DNS said about a From: domain's DMARC policy."""

    record: DmarcRecord | None
    policy: Policy  # the one that applies to this From: domain (p or sp)
    record_domain: str = ""
    temperror: str = ""  # non-empty: the lookup failed temporarily
    permerror: str = ""  # non-empty: more than one record or a broken one


def _records(answer: Answer[TxtRecord]) -> list[str]:
    return [r.text for r in answer.records if r.text.replace(" ", "").startswith("v=DMARC1")]


async def _fetch(resolver: Resolver, domain: str) -> list[str]:
    try:
        answer = await resolver.txt(f"_dmarc.{domain}")
    except DnsNotFound:
        return []
    return _records(answer)


def _cached_records(resolver: Resolver, domain: str) -> list[str] | None:
    try:
        answer = resolver.cached_txt(f"_dmarc.{domain}")
    except DnsNotFound:
        return []
    return None if answer is None else _records(answer)


async def discover_policy(resolver: Resolver, from_domain: str) -> PolicyLookup:
    """§6.6.3: the From: domain's record, else its organisational domain's."""
    org = organizational_domain(from_domain)
    try:
        found = await _fetch(resolver, from_domain)
        record_domain = from_domain
        if not found and org != from_domain:
            found = await _fetch(resolver, org)
            record_domain = org
    except DnsTempError as exc:
        return PolicyLookup(None, "none", temperror=f"DMARC record lookup: {exc.reason}")
    return _policy(found, record_domain, from_domain)


def cached_policy(resolver: Resolver, from_domain: str) -> PolicyLookup | None:
    """What :func:`discover_policy` would find, when the resolver's cache already holds
    every record it needs; None when DNS has to be asked."""
    found = _cached_records(resolver, from_domain)
    record_domain = from_domain
    org = organizational_domain(from_domain)
    if found == [] and org != from_domain:
        found = _cached_records(resolver, org)
        record_domain = org
    return None if found is None else _policy(found, record_domain, from_domain)


def _policy(found: list[str], record_domain: str, from_domain: str) -> PolicyLookup:
    if not found:
        return PolicyLookup(None, "none")
    if len(found) > 1:
        return PolicyLookup(None, "none", record_domain, permerror="more than one DMARC record")
    record = parse_record(found[0])
    if record is None:
        return PolicyLookup(None, "none", record_domain, permerror="unusable DMARC record")
    applies = record.policy if record_domain == from_domain else record.subdomain_policy
    return PolicyLookup(record, applies, record_domain)


def from_domain_of(from_values: list[str]) -> tuple[str, str]:
    """(domain, problem): the RFC5322.From domain, or a reason it has none usable.

    §6.6.1: a message with no From:, several From: fields, or several
    addresses in different domains cannot be evaluated.
    """
    if len(from_values) != 1:
        return "", f"{len(from_values)} From: fields"
    return _from_domain(from_values[0])


@functools.lru_cache(maxsize=4096)
def _from_domain(from_value: str) -> tuple[str, str]:
    """from_domain_of for one From: value (pure, so memoised: bulk senders repeat it)."""
    from_values = [from_value]
    addresses = [addr for _name, addr in getaddresses(from_values) if addr]
    domains = {addr.rpartition("@")[2].lower().rstrip(".") for addr in addresses}
    domains.discard("")
    if len(domains) != 1:
        return "", "no single author domain in From:"
    domain = domains.pop()
    if not re.fullmatch(r"[a-z0-9.-]+", domain) or "." not in domain:
        return "", f"unusable From: domain {domain[:60]!r}"
    return domain, ""


@dataclass(frozen=True, slots=True)
class AuthIdentity:
    """An authenticated identifier that DMARC may use: SPF's or a DKIM d=."""

    domain: str
    result: str  # the SPF or DKIM result


# §6.6.4: a failing message not picked by pct= gets the next weaker policy.
_WEAKER: dict[Policy, Policy] = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def evaluate(
    from_domain: str,
    lookup: PolicyLookup,
    spf: AuthIdentity | None,
    dkim: list[AuthIdentity],
    sample: Callable[[], float] = random.random,
) -> tuple[MethodResult, Policy]:
    """§6.6.2: pass if an aligned SPF or DKIM identifier passed.

    Returns the A-R clause and the policy to apply on failure ("none" on pass).
    A temporary failure of an identifier that could have been aligned makes
    the result ``temperror`` (it might have passed), as does a failed lookup.
    With ``pct=`` below 100, a failing message gets the record's policy only if
    ``sample()`` (uniform in [0, 1)) falls below pct/100, else the next weaker
    one (§6.6.4): the way a domain owner rolls a policy out gradually.
    """
    props = (("header.from", from_domain),)
    if lookup.temperror:
        return MethodResult("dmarc", "temperror", lookup.temperror, props), "none"
    if lookup.permerror:
        return MethodResult("dmarc", "permerror", lookup.permerror, props), "none"
    record = lookup.record
    if record is None:
        return MethodResult("dmarc", "none", "no DMARC record", props), "none"
    spf_aligned = spf is not None and aligned(spf.domain, from_domain, record.aspf)
    dkim_aligned = [d for d in dkim if aligned(d.domain, from_domain, record.adkim)]
    policy = lookup.policy
    if record.pct < 100 and policy != "none" and sample() * 100 >= record.pct:
        policy = _WEAKER[policy]
    pct = f" pct={record.pct}" if record.pct < 100 else ""
    comment = f"p={record.policy} sp={record.subdomain_policy}{pct} dis={policy}"
    if (spf_aligned and spf is not None and spf.result == "pass") or any(
        d.result == "pass" for d in dkim_aligned
    ):
        why = "dkim" if any(d.result == "pass" for d in dkim_aligned) else "spf"
        clause = MethodResult(
            "dmarc", "pass", f"p={record.policy} sp={record.subdomain_policy}; aligned {why}", props
        )
        return clause, "none"
    maybe = (spf_aligned and spf is not None and spf.result == "temperror") or any(
        d.result == "temperror" for d in dkim_aligned
    )
    if maybe:
        return MethodResult("dmarc", "temperror", "aligned identifier lookup failed", props), "none"
    return MethodResult("dmarc", "fail", comment, props), policy
