"""MTA-STS (RFC 8461) for one MX host: the decision before connecting, the check after TLS.

Design note
-----------
Pure: the policy comes in (``sts_policies.StsPolicies`` finds it: cache, TXT, fetch), the
chain and trust anchors come in, a value goes out. The transport asks :func:`decide`
before connecting to an MX host and :func:`check` right after STARTTLS, before MAIL, the
same two doors the DANE hook uses (``dane_policy.DaneHook.requirement``/``check``):

===============================  ===========================================================
policy (recipient domain)        decision for MX host H
===============================  ===========================================================
none, ``mode: none``,            ``None``: MTA-STS says nothing; the other policies apply
or DANE applies to H (§2)
``enforce``, H not in ``mx:``    :class:`StsRefusal`: do not connect; try the next MX, then
                                 defer ("MTA-STS: H does not match the policy of D", §4.1)
``enforce``, H matches           :class:`StsRequirement`: STARTTLS required, and the
                                 certificate must be valid for H under the web PKI (§4.2)
``testing``                      :class:`StsRequirement` (mode testing): the same checks, a
                                 failure is logged and delivery goes on (§5)
===============================  ===========================================================

An enforce requirement is the tlsverify branch's ``TlsRequirement("verify", match=(H,),
ca_file=sts_ca_file, source="mta-sts D")``; :func:`check` returns the same fields as its
``TlsCheck`` and DANE's ``DaneCheck`` (``ok``, ``verified``, ``result``, ``reason``), so the
three merge into one gate. ``result`` uses RFC 8460's result types where one fits.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from postillon.core.sts import StsPolicy
from postillon.outbound.tls import verify_chain

__all__ = ["StsCheck", "StsRefusal", "StsRequirement", "check", "decide"]

# RFC 3463 X.7.5 "cryptographic failure" (as DANE): a host refused by the TLS policy.
STS_STATUS = "4.7.5"


@dataclass(frozen=True, slots=True)
class StsRequirement:
    """MTA-STS applies to connections to ``host``; hashable (connections are pooled by
    it). ``domain`` (the policy's, for logs) and ``mismatch`` (testing: why the host
    would have been refused) do not take part in equality: a connection that proved
    itself for ``host`` serves every domain whose policy lists it."""

    host: str
    mode: Literal["enforce", "testing"]
    ca_file: str | None = None
    domain: str = field(default="", compare=False)
    mismatch: str = field(default="", compare=False)

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    @property
    def starttls(self) -> Literal["required", "opportunistic"]:
        """enforce: no delivery in clear (§5); testing: whatever the host offers."""
        return "required" if self.enforced else "opportunistic"


@dataclass(frozen=True, slots=True)
class StsRefusal:
    """An enforce policy excludes ``host``: do not connect (RFC 8461 §4.1, §5)."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class StsCheck:
    """What a finished handshake proved against a :class:`StsRequirement` (see the note)."""

    ok: bool
    verified: bool
    result: str
    reason: str = ""


def decide(
    domain: str,
    policy: StsPolicy | None,
    host: str,
    *,
    ca_file: str | None = None,
    dane_applies: bool = False,
) -> StsRequirement | StsRefusal | None:
    """The MTA-STS decision for MX host ``host`` of recipient domain ``domain``.

    ``dane_applies``: DANE (RFC 7672) has a requirement for this host; then DANE alone
    decides (RFC 8461 §2: "senders who implement DANE ... SHOULD use DANE").
    """
    if policy is None or policy.mode == "none" or dane_applies:
        return None
    if policy.covers(host):
        return StsRequirement(host, policy.mode, ca_file, domain)
    reason = f"MTA-STS: {host} does not match the policy of {domain}"
    if policy.mode == "enforce":
        return StsRefusal(host, reason)
    return StsRequirement(host, "testing", ca_file, domain, mismatch=reason)


def check(
    requirement: StsRequirement,
    chain: Sequence[bytes] | None,
    *,
    anchors: Sequence[Any],
    now: datetime.datetime,
) -> StsCheck:
    """After STARTTLS (``chain``: the server's certificates, DER, leaf first; None when
    the session is not encrypted): was the host what the policy asks for?

    §4.2: the certificate must chain to a trusted root and name the MX host (a wildcard
    covers one label), be unexpired; nothing is said about the host's own DNS.
    """
    host = requirement.host
    if requirement.mismatch:  # testing only: the host is not in the policy
        return StsCheck(False, False, "validation-failure", requirement.mismatch)
    if chain is None:
        return StsCheck(
            False, False, "starttls-not-supported", f"MTA-STS: {host} does not offer STARTTLS"
        )
    error = verify_chain(chain, host, anchors, now)
    if error:
        return StsCheck(
            False,
            False,
            "certificate-host-mismatch" if "subjectAltName" in error else "sts-webpki-invalid",
            f"MTA-STS: certificate not valid for {host}: {error}",
        )
    return StsCheck(True, True, "sts")
