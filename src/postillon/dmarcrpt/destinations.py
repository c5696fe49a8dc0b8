"""Where a DMARC aggregate report may go: the ``rua=`` URIs and RFC 7489 §7.1.

A ``rua=`` value is a comma-separated list of URIs, each with an optional size limit
after ``!`` (``mailto:dmarc@example.com!10m``: k, m, g, t are binary units, §6.2).
postillon sends by mail only (``mailto:``); other schemes are skipped with a reason.

§7.1: when a destination's domain is not in the policy domain's organisational domain,
the destination must agree to receive reports: a TXT record at
``<policy domain>._report._dmarc.<destination domain>`` starting with ``v=DMARC1``.
Without it, the destination is dropped (a domain cannot make us mail reports to a
stranger). A DNS failure drops it for this run, too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from postillon.checks.dmarc_check import organizational_domain
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver

__all__ = ["Destination", "parse_rua", "verify_external"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)([kmgt]?)", re.I)


@dataclass(frozen=True, slots=True)
class Destination:
    uri: str  # as written
    address: str  # the mailto: address ("" when not usable)
    max_size: int | None = None  # octets; None = no limit given
    problem: str = ""  # why it is not usable

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


def parse_rua(uris: tuple[str, ...]) -> list[Destination]:
    out: list[Destination] = []
    for uri in uris:
        target, _, size_text = uri.partition("!")
        max_size = None
        if size_text:
            found = _SIZE.fullmatch(size_text.strip())
            if found is None:
                out.append(Destination(uri, "", problem=f"bad size limit {size_text!r}"))
                continue
            max_size = int(found.group(1)) * _UNITS[found.group(2).lower()]
        scheme, colon, rest = target.strip().partition(":")
        if not colon or scheme.lower() != "mailto":
            out.append(Destination(uri, "", max_size, "only mailto: destinations are supported"))
            continue
        address = unquote(rest.split("?", 1)[0]).strip()
        local, _, domain = address.rpartition("@")
        bad = address.count("@") != 1 or any(c.isspace() or c in "<>,;" for c in address)
        if bad or not local or "." not in domain:
            out.append(Destination(uri, "", max_size, f"not an address: {address[:80]!r}"))
            continue
        out.append(Destination(uri, address, max_size))
    return out


async def verify_external(resolver: Resolver, policy_domain: str, dest: Destination) -> str:
    """ "" when ``dest`` may get the reports of ``policy_domain`` (§7.1), else why not."""
    if organizational_domain(dest.domain) == organizational_domain(policy_domain):
        return ""
    name = f"{policy_domain}._report._dmarc.{dest.domain}"
    try:
        answer = await resolver.txt(name)
    except DnsNotFound:
        return f"external destination not authorised: no TXT record at {name}"
    except DnsTempError as exc:
        return f"external destination not verified: TXT lookup of {name} failed: {exc.reason}"
    if any(r.text.replace(" ", "").startswith("v=DMARC1") for r in answer.records):
        return ""
    return f"external destination not authorised: no v=DMARC1 record at {name}"
