"""SMTP TLS reporting (RFC 8460) values shared by the store, the recorder and the reports.

Design note
-----------
Every outbound SMTP session ends with one TLS result per policy domain (the
recipient domain whose MX hosts were tried, RFC 8460 §4.3.1 "policy-domain").
Reports are daily aggregates (§4.1: "a 24-hour period"), so the store keeps
counts, not sessions: one :class:`TlsResultCount` row per (UTC day, policy
domain, policy, result, and for failures the MX host and the two IPs), whose
``count`` an UPSERT increments. Successes keep no MX or IPs: a report only
sums them (§4.4 ``total-successful-session-count``), and leaving them out keeps
one row per policy and day however many hosts take the mail.

``policy_type`` is §4.4's ``policy-type`` (``sts``, ``tlsa``,
``no-policy-found``) and ``policy_strings`` its ``policy-string`` (the MTA-STS
policy lines, or the TLSA records in presentation form). ``result`` is
``success`` or one §4.3 result type; ``reason_code`` keeps postillon's own
label (``tlsa-mismatch``, ``not-verified``, ...) for §4.4's
``failure-reason-code``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "POLICY_TYPES",
    "RESULT_TYPES",
    "SUCCESS",
    "PolicyType",
    "TlsResultCount",
    "utc_day",
]

PolicyType = Literal["sts", "tlsa", "no-policy-found"]
POLICY_TYPES: Final = frozenset({"sts", "tlsa", "no-policy-found"})
SUCCESS: Final = "success"

# RFC 8460 §4.3: the result types a failure can have (negotiation failures
# §4.3.1, policy failures §4.3.2 for MTA-STS and DANE, general §4.3.3).
RESULT_TYPES: Final = frozenset(
    {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }
)


@dataclass(frozen=True, slots=True)
class TlsResultCount:
    """``count`` sessions of one UTC ``day`` (``YYYY-MM-DD``) with the same outcome
    (see the module note). Successes carry no ``mx_host`` or IPs."""

    day: str
    policy_domain: str
    policy_type: str
    policy_strings: tuple[str, ...]
    result: str
    mx_host: str = ""
    sending_ip: str = ""
    receiving_ip: str = ""
    reason_code: str = ""
    count: int = 1

    @property
    def is_success(self) -> bool:
        return self.result == SUCCESS

    @property
    def key(self) -> str:
        """What makes two rows of one day and domain the same counter: a fixed-size
        digest (policy strings may hold whole certificates: TLSA matching type 0),
        so both SQL stores can index it."""
        parts = [
            self.policy_type,
            list(self.policy_strings),
            self.result,
            self.mx_host,
            self.sending_ip,
            self.receiving_ip,
            self.reason_code,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def with_count(self, count: int) -> TlsResultCount:
        return TlsResultCount(
            self.day,
            self.policy_domain,
            self.policy_type,
            self.policy_strings,
            self.result,
            self.mx_host,
            self.sending_ip,
            self.receiving_ip,
            self.reason_code,
            count,
        )


def utc_day(timestamp: float) -> str:
    """The UTC calendar day of ``timestamp`` (RFC 8460 §4.1: UTC 24-hour periods)."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d")
