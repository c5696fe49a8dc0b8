"""DMARC aggregate reporting (RFC 7489 §7.2) values shared by the store, the recorder and
the reports.

Design note
-----------
Each DMARC evaluation of an inbound message whose author domain's record asks for
aggregate reports (``rua=``) becomes one count in the queue store. Reports are daily
aggregates per policy domain, so the store keeps counts, not messages: one
:class:`DmarcResultCount` row per (UTC day, policy domain, and everything a report
``<record>`` distinguishes: source IP, From: domain, envelope sender and recipient
domains, disposition, the two aligned results, and the raw SPF and DKIM results),
whose ``count`` an UPSERT increments. ``published`` is the ``<policy_published>``
seen at evaluation time (``p``, ``sp``, ``pct``, ``adkim``, ``aspf``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

__all__ = ["AuthResult", "DmarcResultCount", "PublishedPolicy"]


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    """RFC 7489 Appendix C ``PolicyPublishedType``."""

    domain: str
    adkim: str = "r"
    aspf: str = "r"
    p: str = "none"
    sp: str = "none"
    pct: int = 100

    def as_list(self) -> list[str | int]:
        return [self.domain, self.adkim, self.aspf, self.p, self.sp, self.pct]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One raw SPF or DKIM result (``DKIMAuthResultType``/``SPFAuthResultType``);
    ``detail`` is the DKIM selector or the SPF scope (``mfrom``/``helo``)."""

    domain: str
    result: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResultCount:
    """``count`` evaluations of one UTC ``day`` with the same outcome (see the note)."""

    day: str
    policy_domain: str
    published: PublishedPolicy
    source_ip: str
    header_from: str
    envelope_from: str
    envelope_to: str
    disposition: str  # none | quarantine | reject
    dkim: str  # the DMARC-aligned DKIM result: pass | fail
    spf: str  # the DMARC-aligned SPF result: pass | fail
    dkim_results: tuple[AuthResult, ...] = ()
    spf_results: tuple[AuthResult, ...] = ()
    count: int = 1

    @property
    def key(self) -> str:
        """A digest of every column but the day, domain and count: the counter's name."""
        parts = [
            self.published.as_list(),
            self.source_ip,
            self.header_from,
            self.envelope_from,
            self.envelope_to,
            self.disposition,
            self.dkim,
            self.spf,
            [[r.domain, r.result, r.detail] for r in self.dkim_results],
            [[r.domain, r.result, r.detail] for r in self.spf_results],
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def with_count(self, count: int) -> DmarcResultCount:
        return replace(self, count=count)

    def detail_json(self) -> str:
        """Everything but day, domain, source IP, key and count, as stored."""
        return json.dumps(
            {
                "published": self.published.as_list(),
                "header_from": self.header_from,
                "envelope_from": self.envelope_from,
                "envelope_to": self.envelope_to,
                "disposition": self.disposition,
                "dkim": self.dkim,
                "spf": self.spf,
                "dkim_results": [[r.domain, r.result, r.detail] for r in self.dkim_results],
                "spf_results": [[r.domain, r.result, r.detail] for r in self.spf_results],
            },
            sort_keys=True,
        )

    @classmethod
    def from_stored(
        cls, day: str, domain: str, source_ip: str, detail: str, count: int
    ) -> DmarcResultCount:
        d = json.loads(detail)
        pub = d["published"]
        return cls(
            day,
            domain,
            PublishedPolicy(pub[0], pub[1], pub[2], pub[3], pub[4], int(pub[5])),
            source_ip,
            d["header_from"],
            d["envelope_from"],
            d["envelope_to"],
            d["disposition"],
            d["dkim"],
            d["spf"],
            tuple(AuthResult(*r) for r in d["dkim_results"]),
            tuple(AuthResult(*r) for r in d["spf_results"]),
            count,
        )
