"""MTA-STS (RFC 8461) for one MX host: the policy turned into ``tls_policy``'s values.

Design note
-----------
Pure: the recipient domain's policy comes in (``sts_policies.StsPolicies`` finds it:
cache, TXT id, fetch), a value goes out, and that value is one input of
``tls_policy.decide(sts=...)`` (precedence 4: after the operator's final rules and
DANE, RFC 8461 §2). There is no MTA-STS gate of its own: an enforce match is a
``verify`` requirement that ``tls.check_requirement`` judges after STARTTLS like any
other, and a refusal is a ``HostRefused`` like DANE's.

===============================  ===========================================================
policy (recipient domain D)      value for MX host H
===============================  ===========================================================
none, or ``mode: none``          ``None``: MTA-STS says nothing; the other policies apply
``enforce``, H not in ``mx:``    ``HostRefused`` ("MTA-STS: H does not match the policy of
                                 D", result ``validation-failure``): not connected to; the
                                 next MX is tried, then the mail deferred (§4.1, §5)
``enforce``, H matches           ``TlsRequirement("verify", match=(H,), ca_file=sts_ca_file,
                                 source="mta-sts D", sts="enforce")``: STARTTLS required,
                                 the certificate valid for H under the web PKI (§4.2)
``testing``                      ``TlsRequirement(sts="testing")`` (its mode is only a
                                 placeholder: ``decide`` keeps the other policies' mode);
                                 checked as enforce would be, a failure logged, delivery
                                 goes on (§5). ``match`` is ``()`` when D does not list H.
===============================  ===========================================================

``tls.check_requirement`` labels MTA-STS failures with RFC 8460's result types
(``certificate-host-mismatch``, ``sts-webpki-invalid``, ``validation-failure``) for
TLS reporting; ``requirement.sts`` says which requirements they are.
"""

from __future__ import annotations

from postillon.core.sts import StsPolicy, format_policy
from postillon.outbound.tls_policy import HostRefused, TlsRequirement

__all__ = ["STS_MISMATCH", "decide"]

# RFC 8460 §4.3.1: no category fits "the MX host is not in the policy", so the general one.
STS_MISMATCH = "validation-failure"


def decide(
    domain: str, policy: StsPolicy | None, host: str, *, ca_file: str | None = None
) -> TlsRequirement | HostRefused | None:
    """The MTA-STS decision for MX host ``host`` of recipient domain ``domain``.

    ``ca_file``: ``[outbound] sts_ca_file``, the anchors instead of the system's.
    Whether DANE wins for this host is ``tls_policy.decide``'s business, not this.
    """
    if policy is None or policy.mode == "none":
        return None
    source = f"mta-sts {domain}"
    text = format_policy(policy)  # what TLS reports show as the policy (RFC 8460 §4.4)
    if policy.covers(host):
        if policy.mode == "enforce":
            return TlsRequirement(
                "verify",
                match=(host,),
                ca_file=ca_file,
                source=source,
                sts="enforce",
                sts_policy=text,
            )
        return TlsRequirement(
            "opportunistic",
            match=(host,),
            ca_file=ca_file,
            source=source,
            sts="testing",
            sts_policy=text,
        )
    if policy.mode == "enforce":
        return HostRefused(
            f"MTA-STS: {host} does not match the policy of {domain}",
            STS_MISMATCH,
            "verify",
            sts_policy=text,
        )
    return TlsRequirement(
        "opportunistic", ca_file=ca_file, source=source, sts="testing", sts_policy=text
    )
