"""postillon's TLS result labels → RFC 8460 §4.3 result types: the one table.

The transport labels each session's TLS result for its metric
(``postillon_outbound_tls_sessions_total{policy,result}``): ``TlsCheck.result``
after a handshake, ``SessionError.tls_result`` when the session failed its
policy, ``HostRefused.result`` when a host was refused before connecting. A
report speaks RFC 8460's vocabulary instead; :data:`RESULT_TYPE` translates.
MTA-STS's own check already answers in RFC 8460's names (and ``sts`` for a
pass): a label that is a result type maps to itself.

``not-verified`` (web PKI, a ``[[tls_policy]] verify`` rule) covers three of
RFC 8460's certificate results; the verifier's reason tells them apart
(:data:`CERTIFICATE_REASONS`, phrases of ``cryptography``'s verifier).
"""

from __future__ import annotations

from typing import Final

from postillon.core.tlsrpt import RESULT_TYPES, SUCCESS

__all__ = ["CERTIFICATE_REASONS", "NOT_REPORTED", "RESULT_TYPE", "UNKNOWN", "result_type"]

# label → "success" or an RFC 8460 §4.3 result type.
RESULT_TYPE: Final[dict[str, str]] = {
    # The session met its requirement with TLS (§4.4 total-successful-session-count).
    "verified": SUCCESS,  # web PKI, for the required name
    "pinned": SUCCESS,  # [[tls_policy]] fingerprint
    "dane-ta": SUCCESS,  # RFC 7672 §3.1.2
    "dane-ee": SUCCESS,  # RFC 7672 §3.1.1
    "sts": SUCCESS,  # MTA-STS (RFC 8461 §4.2) passed
    "unverified": SUCCESS,  # opportunistic/encrypt: any certificate is the policy (RFC 7435)
    # §4.3.1 negotiation failures.
    "plaintext": "starttls-not-supported",  # opportunistic, the server offered no STARTTLS
    "starttls-refused": "starttls-not-supported",  # offered, then refused
    "not-verified": "certificate-not-trusted",  # refined by CERTIFICATE_REASONS
    "fingerprint-mismatch": "certificate-not-trusted",
    "no-certificate": "validation-failure",
    "handshake-failed": "validation-failure",
    # §4.3.2.1 DANE policy failures.
    "tlsa-mismatch": "validation-failure",  # usable TLSA, the chain matched none
    "tlsa-unusable": "tlsa-invalid",  # "none of the records in the RRset ... valid"
    "dnssec-bogus": "dnssec-invalid",  # RFC 7672 §2.1.1: bogus TLSA answer
    "dane-lookup-failed": "dnssec-invalid",  # no valid answer from the resolver
    "dane-unavailable": "dane-required",  # a policy = "dane" rule, no secure TLSA
}
# The result type for a label not in the table (§4.3.3: "a general failure").
UNKNOWN: Final = "validation-failure"

# Labels that are about this server, not the receiving domain: never reported.
NOT_REPORTED: Final = frozenset({"config-error"})

# For ``not-verified``: the verifier's reason → the certificate result (first match).
CERTIFICATE_REASONS: Final[tuple[tuple[str, str], ...]] = (
    ("no matching subjectAltName", "certificate-host-mismatch"),
    ("not valid at validation time", "certificate-expired"),
)


def result_type(mode: str, label: str, reason: str = "") -> str | None:
    """``success``, an RFC 8460 result type, or None when the session is not
    reported: ``[[tls_policy]] policy = "none"`` sessions never try TLS (there is no
    TLS result to report), and :data:`NOT_REPORTED` labels."""
    if mode == "none" or label in NOT_REPORTED:
        return None
    if label in RESULT_TYPES:
        return label
    mapped = RESULT_TYPE.get(label, UNKNOWN)
    if label == "not-verified":
        for phrase, refined in CERTIFICATE_REASONS:
            if phrase in reason:
                return refined
    return mapped
