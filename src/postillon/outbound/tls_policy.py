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
    "TlsMode",
    "TlsRequirement",
    "for_credentials",
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
    """

    mode: TlsMode
    match: tuple[str, ...] = ()
    ca_file: str | None = None
    fingerprints: tuple[bytes, ...] = ()
    source: str = ""

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
