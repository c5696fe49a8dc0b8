"""What the SMTP transport tells an observer about each session's TLS: one value, one call.

Design note
-----------
The transport counts every outbound session's TLS result in one place
(``SmtpTransport._count_tls``: the ``postillon_outbound_tls_sessions_total``
metric), for the three ways a host attempt ends: refused before connecting
(``tls_policy.HostRefused``: bogus DNSSEC, mandatory DANE without usable TLSA),
failed by the post-handshake gate (``SessionError.tls_result``), or connected
(``TlsCheck.result``, or ``plaintext``). At that same seam it hands a
:class:`TlsSessionResult` to a :class:`TlsObserver`, when one is configured
(``[tls_reports]``, RFC 8460: ``tlsrpt.recorder``). The observer is called
synchronously on the delivery path, so it must only take note (the recorder
adds to an in-memory counter and flushes to the store in the background).

Only MX deliveries are observed (``policy_domain`` is the domain whose MX hosts
were tried, RFC 8460 §4.3.1): a smarthost or transport route is the operator's
choice of next hop, not the recipient domain's, and its TLS is nothing to report
to that domain.

The published policy (RFC 8460 §4.4 ``policy-type`` / ``policy-string``) comes
from the requirement: ``dane`` → ``tlsa`` with the usable TLSA records in
presentation form (``3 1 1 <hex>``); MTA-STS → ``sts`` with the policy's lines
(:func:`published_policy`'s ``sts_lines``: the MTA-STS branch passes them);
anything else - the ``[outbound] tls`` default or a ``[[tls_policy]]`` rule, which
are the sender's own settings, not a published policy - is ``no-policy-found``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from postillon.dns.resolver import TlsaRecord
from postillon.outbound.tls_policy import HostRefused, TlsRequirement

__all__ = [
    "TlsObserver",
    "TlsSessionResult",
    "observe_session",
    "published_policy",
    "tlsa_text",
]


@dataclass(frozen=True, slots=True)
class TlsSessionResult:
    """One host attempt's TLS outcome. ``mode``: the requirement's mode (``none``,
    ``opportunistic``, ..., ``dane``); ``result``: postillon's label (``verified``,
    ``dane-ee``, ``tlsa-mismatch``, ``starttls-not-supported``, ``plaintext``,
    ``dnssec-bogus``, ...); ``receiving_ip``: the address tried ("" when none)."""

    policy_domain: str
    mode: str
    result: str
    mx_host: str
    receiving_ip: str
    policy_type: str
    policy_strings: tuple[str, ...]
    reason: str = ""  # why it failed, as logged (tells a wrong name from an expired one)


class TlsObserver(Protocol):
    """Told of every observed session (see the module note); must not block."""

    def tls_session(self, result: TlsSessionResult) -> None: ...


def tlsa_text(record: TlsaRecord) -> str:
    """RFC 6698 §2.2 presentation form: ``usage selector mtype hex``."""
    return f"{record.usage} {record.selector} {record.mtype} {record.data.hex()}"


def published_policy(
    mode: str,
    tlsa: Sequence[TlsaRecord] | None,
    *,
    sts_lines: Sequence[str] | None = None,
) -> tuple[str, tuple[str, ...]]:
    """(policy-type, policy-strings) of RFC 8460 §4.4 for a session under ``mode``.

    ``tlsa``: the requirement's usable TLSA records (None when not looked up);
    ``sts_lines``: the MTA-STS policy that applied, as its text lines (None: none).
    DANE first: it wins over MTA-STS where both apply (RFC 8461 §2)."""
    if mode == "dane":
        return "tlsa", tuple(tlsa_text(r) for r in tlsa or ())
    if sts_lines is not None:
        return "sts", tuple(sts_lines)
    return "no-policy-found", ()


def observe_session(
    observer: TlsObserver,
    requirement: TlsRequirement | HostRefused | None,
    result: str,
    where: tuple[str, str, str],
    reason: str = "",
) -> None:
    """Tell ``observer`` one MX session's result; ``where``: (policy domain, MX host,
    address). ``requirement``: what applied (a refused host's ``HostRefused``)."""
    mode = requirement.mode if requirement is not None else "none"
    applied = requirement if isinstance(requirement, TlsRequirement) else None
    tlsa = applied.tlsa if applied is not None else None
    # An MX an enforce policy refused is reported under that policy (sts), not
    # as no-policy-found (RFC 8460 §4.3); HostRefused carries its text.
    sts_text = requirement.sts_policy if requirement is not None else ""
    policy_type, strings = published_policy(
        mode, tlsa, sts_lines=sts_text.splitlines() if sts_text else None
    )
    failure = applied.sts_failure if applied is not None else None
    if failure is not None:  # no MTA-STS policy to apply: that is the result
        policy_type, strings, (result, reason) = "sts", (), failure
    domain, host, address = where
    observer.tls_session(
        TlsSessionResult(domain, mode, result, host, address, policy_type, strings, reason)
    )
