"""What a domain should publish, computed from the configuration and the DKIM keys."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Literal

from postillon.config.model import Config, split_host_port
from postillon.core.sts import Mode, StsPolicy, format_policy
from postillon.signing.keys import DkimKey

RecordKind = Literal["MX", "SPF", "HELO-SPF", "DKIM", "DMARC", "MTA-STS", "MTA-STS-HOST", "TLS-RPT"]

DEFAULT_TTL = 3600


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish: ``name`` (absolute, no final dot), type and value (for TXT the
    text, unquoted). ``note`` says why, as a zone-file comment."""

    kind: RecordKind
    name: str
    rtype: Literal["MX", "TXT", "A", "AAAA", "CNAME"]
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
    """Everything to publish for ``domain``, and the MTA-STS policy file's text.
    ``mta_sts_listen``: where postillon serves that file itself ([mta_sts] listen),
    None when another web server must."""

    domain: str
    hostname: str
    records: tuple[Record, ...]
    mta_sts_policy: str
    dkim_missing: bool
    mta_sts_listen: str | None = None

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
        url = f"https://mta-sts.{self.domain}/.well-known/mta-sts.txt"
        if self.mta_sts_listen is not None:
            lines.append(f"; postillon serves {url}")
            lines.append(f"; ([mta_sts] listen = {self.mta_sts_listen}) with this policy:")
        else:
            lines.append(f"; MTA-STS also needs {url}")
            lines.append(
                f"; (a web server with a valid certificate for mta-sts.{self.domain}) holding:"
            )
        lines.extend(f";   {line}" for line in self.mta_sts_policy.splitlines())
        lines.append(
            "; The _mta-sts id is derived from this policy: it changes whenever the policy"
        )
        lines.append(
            "; does ([mta_sts] mode, max_age, mx), and senders only fetch the policy again"
        )
        lines.append("; when the id they see changes (RFC 8461 3.1): publish the new one then.")
        return "\n".join(lines) + "\n"


def served_policy(config: Config) -> StsPolicy:
    """The MTA-STS policy of this server's domains, from ``[mta_sts]``: what postillon
    serves (``sts_server``) and what ``dns records`` derives the TXT id from."""
    return StsPolicy(config.mta_sts.mode, config.mta_sts.max_age, config.mta_sts_mx)


def mta_sts_policy(hostname: str, mode: Mode = "testing", max_age: int = 604800) -> str:
    """RFC 8461 §3.2. "testing" first: failures are reported (TLS-RPT), not enforced."""
    return format_policy(StsPolicy(mode, max_age, (hostname,)))


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
    sts_policy: StsPolicy | None = None,
    sts_listen: str | None = None,
    acme: bool = False,
) -> DomainPlan:
    """The records for ``domain`` whose mail host is ``hostname`` (``[hostname]``).
    ``sts_policy``: the MTA-STS policy (default: testing, a week, ``hostname``);
    ``sts_listen``: where postillon serves it (``[mta_sts] listen``), if it does;
    ``acme``: ``[tls] acme = true``, whose certificate names the policy host."""
    domain = domain.strip().lower().rstrip(".")
    hostname = hostname.strip().lower().rstrip(".")
    rua = f"mailto:{report_address or 'postmaster@' + domain}"
    policy = format_policy(sts_policy or StsPolicy("testing", 604800, (hostname,)))
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
            *_policy_host(domain, hostname, sts_listen, acme),
            Record(
                "TLS-RPT",
                f"_smtp._tls.{domain}",
                "TXT",
                f"v=TLSRPTv1; rua={rua}",
                "TLS-RPT (RFC 8460): where senders report TLS failures.",
            ),
        ]
    )
    return DomainPlan(
        domain, hostname, tuple(records), policy, dkim_missing=not keys, mta_sts_listen=sts_listen
    )


def _policy_host(domain: str, hostname: str, listen: str | None, acme: bool) -> list[Record]:
    """Where ``mta-sts.DOMAIN`` points when postillon serves the policy (RFC 8461 §3.3:
    senders fetch it from that name, on port 443, over HTTPS)."""
    if listen is None:
        return []
    name = f"mta-sts.{domain}"
    host, port = split_host_port(listen)
    certificate = (
        f"The ACME certificate ([tls] acme) names {name}: senders verify it (RFC 8461 3.3)."
        if acme
        else f"The [tls] certificate must also name {name}: senders verify it (RFC 8461 3.3)."
    )
    note = (
        f"MTA-STS policy host: postillon serves the policy here ([mta_sts] listen = {listen}).\n"
        + certificate
    )
    if port != 443:
        note += f"\nSenders connect to port 443: forward it to port {port}."
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.is_unspecified:
        note += (
            "\nIt may point at the mail host by name (as here), or hold A and AAAA "
            "records with\nthe addresses this host listens on."
        )
        return [Record("MTA-STS-HOST", name, "CNAME", f"{hostname}.", note)]
    rtype: Literal["A", "AAAA"] = "A" if address.version == 4 else "AAAA"
    return [Record("MTA-STS-HOST", name, rtype, str(address), note)]
