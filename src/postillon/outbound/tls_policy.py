"""Which TLS a connection to a next hop must have: a pure resolution step.

Design note
-----------
Before connecting, the transport asks this module what the connection must
prove, and gets a :class:`TlsRequirement` value; after the handshake,
``outbound.tls.check_requirement`` says whether the session met it. Nothing
here does I/O (no DNS, no files, no sockets), so every rule is a table-driven
unit test.

The modes, weakest first (Postfix's ``smtp_tls_security_level`` names):

``none``           never STARTTLS.
``opportunistic``  STARTTLS when offered, any certificate (RFC 7435).
``encrypt``        TLS or no delivery; any certificate (was ``required``).
``verify``         TLS, and the certificate chains to a trusted CA (the system's
                   or ``ca_file``) and names one of ``match``.
``fingerprint``    TLS, and the server's own certificate has a public key whose
                   SPKI SHA-256 is one of ``fingerprints`` (names, CA and
                   expiry are not checked: the pin is the trust).
``dane``           RFC 7672: decided by TLSA records. Resolution only names it;
                   the DANE lookup plugs in through the transport's DANE hook
                   (``smtp_transport.DaneHook``), which turns it into a
                   requirement the verifier can check, or a deferral.

Resolution (:func:`resolve`): the ``[[tls_policy]]`` rule for the next-hop
destination - the recipient domain for MX delivery, the host of a smarthost or
``[[transport]]`` route - exact domain first, then ``.parent`` rules from the
closest parent up; without a rule, ``[outbound] tls``. For ``verify`` the names
to match default to the MX host name (Postfix ``smtp_tls_verify_cert_match =
hostname``): an MX host under the recipient's control is what DNS (unsigned)
can spoof, so name the hosts in ``match`` when the MX is not trusted.

A hop that gets a password (smarthost or route credentials) needs an
*authenticated* mode (verify, fingerprint, dane): :func:`for_credentials`
raises a weaker requirement to ``verify`` (or ``fingerprint`` when pins are
configured) for the hop's host name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AUTHENTICATED_MODES",
    "PolicyRule",
    "TlsMode",
    "TlsPolicyTable",
    "TlsRequirement",
    "for_credentials",
    "resolve",
]

TlsMode = Literal["none", "opportunistic", "encrypt", "verify", "fingerprint", "dane"]
# Modes in which the server proved who it is: only these may see a password.
AUTHENTICATED_MODES: frozenset[str] = frozenset({"verify", "fingerprint", "dane"})


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What one connection must prove; hashable (connections are pooled by it).

    ``match``: names the certificate must be valid for (verify; any one
    suffices). ``ca_file``: the trust anchors for verify, instead of the
    system's. ``fingerprints``: SPKI SHA-256 digests, 32 bytes each
    (fingerprint). ``source``: where the requirement came from, for logs
    ("outbound.tls", "tls_policy partner.example", "relay.smarthost").
    ``requiretls``: the server's EHLO must also list REQUIRETLS (RFC 8689; set
    by ``outbound.requiretls`` for a message that asks for it).
    """

    mode: TlsMode
    match: tuple[str, ...] = ()
    ca_file: str | None = None
    fingerprints: tuple[bytes, ...] = ()
    source: str = ""
    requiretls: bool = False

    @property
    def starttls(self) -> Literal["none", "opportunistic", "required"]:
        """What the session does about STARTTLS."""
        if self.mode == "none":
            return "none"
        if self.mode == "opportunistic":
            return "opportunistic"
        return "required"

    @property
    def authenticated(self) -> bool:
        """The server must prove its identity (a password may be sent)."""
        return self.mode in AUTHENTICATED_MODES


def for_credentials(
    requirement: TlsRequirement,
    host: str,
    *,
    ca_file: str | None = None,
    fingerprints: tuple[bytes, ...] = (),
    source: str = "credentials",
) -> TlsRequirement:
    """The requirement for a hop that will get AUTH: never weaker than verified TLS.

    An already authenticated requirement stands. Otherwise pins, when
    configured, decide (``fingerprint``); else the certificate must verify
    for ``host`` against ``ca_file`` or the system CAs (``verify``).
    """
    if requirement.authenticated:
        return requirement
    if fingerprints:
        return TlsRequirement("fingerprint", fingerprints=fingerprints, source=source)
    return TlsRequirement("verify", match=(host,), ca_file=ca_file, source=source)


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One ``[[tls_policy]]`` entry, checked: ``domain`` is lower case without
    a trailing dot ("partner.example", or ".example" for every subdomain)."""

    domain: str
    mode: TlsMode
    match: tuple[str, ...] = ()
    ca_file: str | None = None
    fingerprints: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsPolicyTable:
    """``[outbound] tls`` (the default) and the ``[[tls_policy]]`` rules."""

    default: TlsMode = "opportunistic"
    rules: tuple[PolicyRule, ...] = ()

    def lookup(self, destination: str) -> PolicyRule | None:
        """The rule for ``destination``: exact, then ``.parent`` from the closest."""
        by_domain = {rule.domain: rule for rule in self.rules}
        name = destination.lower().rstrip(".")
        if name in by_domain:
            return by_domain[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            rule = by_domain.get("." + ".".join(labels[i:]))
            if rule is not None:
                return rule
        return None


def resolve(destination: str, mx_host: str, table: TlsPolicyTable) -> TlsRequirement:
    """What a connection to ``mx_host`` for ``destination`` must prove."""
    rule = table.lookup(destination)
    if rule is None:
        mode = table.default
        match = (mx_host,) if mode == "verify" else ()
        return TlsRequirement(mode, match=match, source="outbound.tls")
    source = f"tls_policy {rule.domain}"
    if rule.mode == "verify":
        return TlsRequirement(
            "verify", match=rule.match or (mx_host,), ca_file=rule.ca_file, source=source
        )
    if rule.mode == "fingerprint":
        return TlsRequirement("fingerprint", fingerprints=rule.fingerprints, source=source)
    return TlsRequirement(rule.mode, source=source)
