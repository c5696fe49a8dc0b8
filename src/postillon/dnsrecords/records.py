"""What a domain should publish, computed from the configuration and the DKIM keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from postillon.signing.keys import DkimKey

RecordKind = Literal["MX", "SPF", "HELO-SPF", "DKIM", "DMARC", "MTA-STS", "TLS-RPT"]

DEFAULT_TTL = 3600


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish: ``name`` (absolute, no final dot), type and value (for TXT the
    text, unquoted). ``note`` says why, as a zone-file comment."""

    kind: RecordKind
    name: str
    rtype: Literal["MX", "TXT"]
    value: str
    note: str

    def zone_line(self, ttl: int = DEFAULT_TTL) -> str:
        value = _quoted(self.value) if self.rtype == "TXT" else self.value
        return f"{self.name}. {ttl} IN {self.rtype} {value}"


def _quoted(text: str) -> str:
    """TXT character-strings of at most 255 bytes each (RFC 1035 §3.3.14), in parentheses
    when there are several, as zone files allow."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    quoted = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    return quoted if len(parts) == 1 else f"( {quoted} )"


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """Everything to publish for ``domain``, and the MTA-STS policy file's text."""

    domain: str
    hostname: str
    records: tuple[Record, ...]
    mta_sts_policy: str
    dkim_missing: bool

    def zone_text(self, ttl: int = DEFAULT_TTL) -> str:
        lines = [f"; DNS records for {self.domain} (mail host {self.hostname})", ""]
        for record in self.records:
            lines.extend(f"; {line}" for line in record.note.splitlines())
            lines.append(record.zone_line(ttl))
            lines.append("")
        if self.dkim_missing:
            lines.append(
                f"; DKIM: no key for {self.domain} yet. Make one (and publish what it prints):"
            )
            lines.append(f";   postillon dkim keygen {self.domain}")
            lines.append(f";   postillon dkim keygen {self.domain} --algorithm ed25519")
            lines.append("")
        lines.append(f"; MTA-STS also needs https://mta-sts.{self.domain}/.well-known/mta-sts.txt")
        lines.append(
            f"; (a web server with a valid certificate for mta-sts.{self.domain}) holding:"
        )
        lines.extend(f";   {line}" for line in self.mta_sts_policy.splitlines())
        lines.append("; Change the _mta-sts id whenever you change the policy (RFC 8461 3.1).")
        return "\n".join(lines) + "\n"


def mta_sts_policy(hostname: str, mode: str = "testing", max_age: int = 604800) -> str:
    """RFC 8461 §3.2. "testing" first: failures are reported (TLS-RPT), not enforced."""
    return f"version: STSv1\nmode: {mode}\nmx: {hostname}\nmax_age: {max_age}\n"


def mta_sts_id(policy: str) -> str:
    """RFC 8461 §3.1: 1 to 32 letters and digits; derived from the policy so it changes
    exactly when the policy does."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def plan_for(
    domain: str,
    hostname: str,
    keys: tuple[DkimKey, ...],
    *,
    report_address: str | None = None,
    smarthost: str | None = None,
) -> DomainPlan:
    """The records for ``domain`` whose mail host is ``hostname`` (``[hostname]``)."""
    domain = domain.strip().lower().rstrip(".")
    hostname = hostname.strip().lower().rstrip(".")
    rua = f"mailto:{report_address or 'postmaster@' + domain}"
    policy = mta_sts_policy(hostname)
    spf_note = (
        "SPF (RFC 7208): the hosts in MX may send mail for the domain. When all of its mail\n"
        "leaves through this server, change ~all (softfail) to -all (fail)."
    )
    if smarthost:
        spf_note += (
            "\nOutgoing mail goes through the smarthost: add its SPF include: as its "
            "provider documents."
        )
    records: list[Record] = [
        Record("MX", domain, "MX", f"10 {hostname}.", "MX: mail for the domain goes to this host."),
        Record("SPF", domain, "TXT", "v=spf1 mx ~all", spf_note),
    ]
    if hostname != domain:
        records.append(
            Record(
                "HELO-SPF",
                hostname,
                "TXT",
                "v=spf1 a -all",
                "SPF for the HELO name (RFC 7208 2.3): this host may send as itself.",
            )
        )
    for key in keys:
        records.append(
            Record(
                "DKIM",
                key.dns_name,
                "TXT",
                key.txt_value(),
                f"DKIM (RFC 6376{', RFC 8463' if key.algorithm == 'ed25519' else ''}): "
                f"the {key.algorithm} public key of selector {key.selector}.",
            )
        )
    records.extend(
        [
            Record(
                "DMARC",
                f"_dmarc.{domain}",
                "TXT",
                f"v=DMARC1; p=none; rua={rua}",
                "DMARC (RFC 7489): p=none collects reports only. Once they show all your mail\n"
                "passing, go to p=quarantine, then p=reject.",
            ),
            Record(
                "MTA-STS",
                f"_mta-sts.{domain}",
                "TXT",
                f"v=STSv1; id={mta_sts_id(policy)}",
                "MTA-STS (RFC 8461): senders must use TLS to the MX hosts in the policy file.",
            ),
            Record(
                "TLS-RPT",
                f"_smtp._tls.{domain}",
                "TXT",
                f"v=TLSRPTv1; rua={rua}",
                "TLS-RPT (RFC 8460): where senders report TLS failures.",
            ),
        ]
    )
    return DomainPlan(domain, hostname, tuple(records), policy, dkim_missing=not keys)
