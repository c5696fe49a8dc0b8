"""Which TLS a connection to a next hop must have: a pure resolution step.

Design note
-----------
Before connecting, the transport asks this module what the connection must
prove, and gets a :class:`TlsRequirement` value; after the handshake,
``outbound.tls.check_requirement`` says whether the session met it (one gate
for every mode, DANE included). Nothing here does I/O (no DNS, no files, no
sockets), so every rule is a table-driven unit test; the DNS lookups that feed
it (DANE: ``dane_policy.DaneHook``; MTA-STS: ``sts_policies.StsPolicies`` and the
pure ``mta_sts.decide``) run in the transport and hand their results in as values.

The modes, weakest first (Postfix's ``smtp_tls_security_level`` names):

``none``           never STARTTLS.
``opportunistic``  STARTTLS when offered, any certificate (RFC 7435).
``encrypt``        TLS or no delivery; any certificate (was ``required``).
``verify``         TLS, and the certificate chains to a trusted CA (the system's
                   or ``ca_file``) and names one of ``match``.
``fingerprint``    TLS, and the server's own certificate has a public key whose
                   SPKI SHA-256 is one of ``fingerprints`` (names, CA and
                   expiry are not checked: the pin is the trust).
``dane``           RFC 7672: TLS, and the chain matches one of ``tlsa`` (the
                   host's usable, DNSSEC-secure TLSA records; ``match`` holds the
                   DANE-TA reference names, §3.2.2). ``tlsa == ()``: secure TLSA
                   records exist but none is usable, so TLS is mandatory but
                   unauthenticated (§2.2). ``tlsa is None``: not looked up yet (a
                   ``[[tls_policy]] policy = "dane"`` rule before :func:`decide`).

Precedence (the one place it is written; docs/tls.md repeats it)
----------------------------------------------------------------
For each host the transport tries, strongest claim first:

1. A ``[[tls_policy]]`` rule for the destination with ``verify``,
   ``fingerprint`` or ``none``: the operator's own statement about this peer
   (its CA, its key, or that it cannot do TLS). Final: no DNS policy is
   looked up (as Postfix's ``smtp_tls_policy_maps`` overrides DANE).
2. A rule with ``dane``: DANE is mandatory ("dane-only", RFC 7672 §2.2). Secure
   usable TLSA → ``dane``; anything else (insecure or unsigned DNS, no TLSA,
   only unusable TLSA, ``[dns] trust_ad`` off) → the host is refused with the
   reason, so the next MX is tried and then the mail is deferred.
3. DANE published in DNS, for MX delivery only (``[dns] trust_ad = true``,
   MX and address answers secure, §2.2): secure TLSA decides (usable →
   ``dane``, none usable → ``dane`` without records); a bogus or failed TLSA
   lookup refuses the host (§2.1.1); no TLSA or insecure → on to 4.
4. MTA-STS (RFC 8461), for the recipient domain's own MX hosts only (not a
   smarthost or a route, RFC 8461 §3.4; ``[outbound] mta_sts``): DANE wins when
   both apply (RFC 8461 §2), so it is consulted only here (the ``sts`` argument
   of :func:`decide`, from ``mta_sts.decide``). ``enforce`` and the host listed →
   ``verify`` for the MX host name (§4.2), marked ``sts="enforce"`` so the check
   labels failures with RFC 8460 result types; ``enforce`` and the host not
   listed → the host is refused (§4.1); ``testing`` → 5 decides, and the
   session is checked as enforce would be and a failure only logged (§5).
5. A rule with ``opportunistic`` or ``encrypt`` (minimums that 3 and 4 may
   raise), else ``[outbound] tls``.

Per message (``outbound.requiretls``, RFC 8689): ``TLS-Required: No`` turns the
table's requirement into a final ``opportunistic`` one before 1-5 (§4.2.2: the
sender chose delivery over DANE, MTA-STS and rules); a REQUIRETLS message
raises the result of 1-5 to ``verify`` for the MX host name unless it is
already authenticated (verify, an MTA-STS enforce match, fingerprint, DANE with
usable records: §4.2.1), and the server must offer REQUIRETLS.

Then, for a hop that gets a password (smarthost or route credentials), the
result must be *authenticated* (verify, fingerprint, dane with records):
:func:`for_credentials` raises anything weaker to ``verify`` (or
``fingerprint`` when pins are configured) for the hop's host name.

Resolution of the table (:func:`resolve`): the rule for the next-hop
destination - the recipient domain for MX delivery, the host of a smarthost
or ``[[transport]]`` route - exact domain first, then ``.parent`` rules from
the closest parent up; without a rule, ``[outbound] tls``. For ``verify`` the
names to match default to the MX host name (Postfix ``smtp_tls_verify_cert_match
= hostname``): an MX host under the recipient's control is what DNS (unsigned)
can spoof, so name the hosts in ``match`` when the MX is not trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from postillon.dns.resolver import TlsaRecord

__all__ = [
    "AUTHENTICATED_MODES",
    "FINAL_RULE_MODES",
    "DefaultMode",
    "HostRefused",
    "NoPublishedPolicy",
    "PolicyRule",
    "TlsMode",
    "TlsPolicyTable",
    "TlsRequirement",
    "consults_dane",
    "consults_sts",
    "decide",
    "for_credentials",
    "resolve",
]

TlsMode = Literal["none", "opportunistic", "encrypt", "verify", "fingerprint", "dane"]
# What [outbound] tls may say: DANE is not a default, it applies by itself where
# published (precedence 3); a destination that must have it gets a rule.
DefaultMode = Literal["none", "opportunistic", "encrypt", "verify"]
# Modes in which the server proves who it is (dane: only with usable records).
AUTHENTICATED_MODES: frozenset[str] = frozenset({"verify", "fingerprint", "dane"})
# Rule modes that are the operator's last word for a destination (precedence 1).
FINAL_RULE_MODES: frozenset[str] = frozenset({"none", "verify", "fingerprint"})


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What one connection must prove; hashable (connections are pooled by it).

    ``match``: names the certificate must be valid for (verify: any one
    suffices; dane: the DANE-TA reference names, RFC 7672 §3.2.2).
    ``ca_file``: the trust anchors for verify, instead of the system's.
    ``fingerprints``: SPKI SHA-256 digests, 32 bytes each (fingerprint).
    ``tlsa``: dane only, the usable TLSA records (see the module note for
    ``()`` and ``None``). ``source``: where the requirement came from, for logs
    ("outbound.tls", "tls_policy partner.example", "dane _25._tcp.mx.example",
    "mta-sts example.net", "credentials"); not part of equality, so a pooled
    connection that proved what one domain's policy asks serves another's that
    asks the same. ``final``: an operator's rule that DNS-published policies
    (DANE, MTA-STS) do not override (precedence 1). ``sts``: the MTA-STS mode
    behind it (precedence 4): "enforce" (a ``verify`` requirement; failures get
    RFC 8460 result names) or "testing" (``match``/``ca_file`` are what enforce
    would check, ``()`` when the policy does not list the host; a failure is
    reported, not fatal, RFC 8461 §5). ``requiretls``: the message asked for
    REQUIRETLS (RFC 8689): the server's EHLO must also list REQUIRETLS, and the
    connection carries only such mail (set by ``outbound.requiretls.require``
    after :func:`decide`, on an authenticated requirement).
    """

    mode: TlsMode
    match: tuple[str, ...] = ()
    ca_file: str | None = None
    fingerprints: tuple[bytes, ...] = ()
    tlsa: tuple[TlsaRecord, ...] | None = None
    source: str = field(default="", compare=False)
    final: bool = False
    sts: Literal["", "enforce", "testing"] = ""
    requiretls: bool = False
    # The MTA-STS policy text behind ``sts`` (for TLS reports' policy-strings, RFC 8460
    # §4.4); not part of equality, like ``source``.
    sts_policy: str = field(default="", compare=False)
    # The recipient domain publishes MTA-STS but its policy could not be had (RFC 8460
    # §4.3.2.2 result type, and why): reported so; not part of equality.
    sts_failure: tuple[str, str] | None = field(default=None, compare=False)

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
        """The server must prove its identity (a password may be sent).

        DANE only with usable records: "no usable TLSA" is encryption without
        authentication (RFC 7672 §2.2), and a ``dane`` rule not yet looked up
        has proved nothing."""
        if self.mode == "dane":
            return bool(self.tlsa)
        return self.mode in AUTHENTICATED_MODES


@dataclass(frozen=True, slots=True)
class HostRefused:
    """Do not connect to this host (try the next, then defer): ``reason`` for
    the log and the deferral, ``result`` the label for metrics ("dnssec-bogus",
    "dane-unavailable", ...), ``mode`` the policy that refused it."""

    reason: str
    result: str
    mode: TlsMode = "dane"
    # The MTA-STS enforce policy that refused the host (its text), for TLS reports
    # (policy-type sts, RFC 8460 §4.4) and the operator's view; "" for DANE's refusals.
    sts_policy: str = ""


@dataclass(frozen=True, slots=True)
class NoPublishedPolicy:
    """The DNS lookup found no policy that applies (DANE: MX, address or TLSA
    answer not DNSSEC-secure, or no TLSA records), and why: the reason a
    mandatory ``dane`` rule gives when it refuses the host."""

    reason: str


def consults_dane(requirement: TlsRequirement, *, mx_delivery: bool) -> bool:
    """Whether the transport looks up DANE for a host under ``requirement``
    (the result of :func:`resolve`): always for a ``dane`` rule, never past a
    final rule, and otherwise only for MX delivery (RFC 7672 §1.3: DANE for
    SMTP is about MX hosts; a smarthost is what the operator named)."""
    if requirement.mode == "dane":
        return True
    return mx_delivery and not requirement.final


def consults_sts(
    requirement: TlsRequirement,
    dane: TlsRequirement | HostRefused | NoPublishedPolicy | None,
    *,
    recipient_mx: bool,
) -> bool:
    """Whether the transport looks up the recipient domain's MTA-STS policy for a
    host: only for the recipient domain's own MX hosts (``recipient_mx``; RFC 8461
    §3.4: a smarthost or route is the operator's choice), never past a final or
    ``dane`` rule, and not where DANE already decided for the host (RFC 8461 §2),
    so a DANE domain costs no HTTPS fetch."""
    if not recipient_mx or requirement.final or requirement.mode == "dane":
        return False
    return not isinstance(dane, TlsRequirement | HostRefused)


def decide(
    requirement: TlsRequirement,
    *,
    dane: TlsRequirement | HostRefused | NoPublishedPolicy | None,
    sts: TlsRequirement | HostRefused | None = None,
    host: str = "",
) -> TlsRequirement | HostRefused:
    """The precedence of the module note, applied to one host.

    ``requirement``: from :func:`resolve`. ``dane``: what the DANE lookup
    found for the host (a ``dane`` requirement, a refusal for bogus or failed
    lookups, or no policy), None when it was not looked up (DANE off, or
    :func:`consults_dane` said no). ``sts``: ``mta_sts.decide`` for the host
    (a requirement with ``sts`` set, a refusal for an enforce policy that does
    not list the host, None: no policy). ``host`` words the reasons.
    """
    if requirement.mode == "dane":  # 2: a rule made DANE mandatory
        where = f"policy dane for {host} ({requirement.source})"
        if dane is None:
            return HostRefused(
                f"{where}: DANE cannot run here ([dns] trust_ad is off, or {host} is no name)",
                "dane-unavailable",
            )
        if isinstance(dane, NoPublishedPolicy):
            return HostRefused(f"{where}: {dane.reason}", "dane-unavailable")
        if isinstance(dane, HostRefused):
            return dane
        if not dane.tlsa:
            # Postfix's dane-only defers too: nothing here can authenticate the host.
            return HostRefused(f"{where}: no usable TLSA record", "tlsa-unusable")
        return replace(dane, source=f"{requirement.source}, {dane.source}")
    if requirement.final:  # 1
        return requirement
    if isinstance(dane, TlsRequirement | HostRefused):  # 3: DANE wins (RFC 8461 §2)
        return dane
    if isinstance(sts, HostRefused):  # 4: enforce, host not listed (RFC 8461 §4.1)
        return sts
    if sts is not None and sts.sts == "enforce":
        # 4: verified TLS for the MX name (§4.2); always at least the minimum of 5,
        # which is never stronger than verify (verify rules are final, at 1).
        return sts
    if sts is not None and requirement.mode in ("opportunistic", "encrypt"):
        # 4, testing (§5): 5 decides what is required; the session is also checked
        # as enforce would check it (match, ca_file: unused by these two modes'
        # own check), a failure only reported. Under verify (the stricter check
        # already applies) or none (no TLS to test) testing changes nothing.
        return replace(
            requirement,
            match=sts.match,
            ca_file=sts.ca_file,
            sts="testing",
            sts_policy=sts.sts_policy,
            source=f"{requirement.source}, {sts.source}",
        )
    return requirement  # 5


def for_credentials(
    requirement: TlsRequirement,
    host: str,
    *,
    ca_file: str | None = None,
    fingerprints: tuple[bytes, ...] = (),
    source: str = "credentials",
) -> TlsRequirement:
    """The requirement for a hop that will get AUTH: never weaker than verified TLS.

    An already authenticated requirement stands (verify, fingerprint, DANE
    with usable records). Otherwise pins, when configured, decide
    (``fingerprint``); else the certificate must verify for ``host`` against
    ``ca_file`` or the system CAs (``verify``).
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

    default: DefaultMode = "opportunistic"
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
    """What the table says a connection to ``mx_host`` for ``destination`` must
    prove, before DNS-published policies (see :func:`decide`)."""
    rule = table.lookup(destination)
    if rule is None:
        mode = table.default
        match = (mx_host,) if mode == "verify" else ()
        return TlsRequirement(mode, match=match, source="outbound.tls")
    source = f"tls_policy {rule.domain}"
    final = rule.mode in FINAL_RULE_MODES
    if rule.mode == "verify":
        return TlsRequirement(
            "verify",
            match=rule.match or (mx_host,),
            ca_file=rule.ca_file,
            source=source,
            final=final,
        )
    if rule.mode == "fingerprint":
        return TlsRequirement(
            "fingerprint", fingerprints=rule.fingerprints, source=source, final=final
        )
    return TlsRequirement(rule.mode, source=source, final=final)
