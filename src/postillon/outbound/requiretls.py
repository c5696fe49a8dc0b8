"""REQUIRETLS (RFC 8689) on the way out: what a message asks of its next hop. Pure.

Design note
-----------
A message received with ``MAIL FROM:<...> REQUIRETLS`` (``MailParams.requiretls``)
may be relayed only over TLS whose server proved its identity, to a server that
itself offers REQUIRETLS, and with REQUIRETLS on our MAIL (§4.2.1), so every hop
keeps the promise. The transport applies these small steps, all here, around
``tls_policy.decide`` (the one precedence resolution per host):

0. :func:`relax` - before the DNS-published policies are looked up:
   ``TLS-Required: No`` (§3, §4.2.2) lets the message go out under
   opportunistic TLS whatever the destination's policy asks (a rule, DANE,
   MTA-STS). The result is ``final``, so ``decide`` stops at its precedence 1
   and no DANE or MTA-STS lookup is made for the message (a hop with a password
   keeps its own floor: ``for_credentials`` is applied after every step).
1. :func:`require` - after ``decide``: the host's ``TlsRequirement`` stands
   when it is already authenticated - ``verify`` (a rule, the default, or an
   MTA-STS enforce match), ``fingerprint``, ``dane`` with usable records
   (DANE-TA/DANE-EE) - as §4.2.1 allows DANE (RFC 7672) or PKIX; otherwise
   (opportunistic, encrypt, MTA-STS testing, DANE with only unusable records)
   it is raised to ``verify`` for the MX host name (WebPKI: the system CAs).
   Either way ``requiretls`` is set on it, so pooled connections that met a
   weaker policy never carry the message. :func:`requirement` is 0 then 1.
2. :func:`session_error` - after the (post-STARTTLS) EHLO: the server must list
   REQUIRETLS.
3. :func:`failure` - a failed connection attempt of a REQUIRETLS message:
   when the failure is the server's TLS or REQUIRETLS (no STARTTLS, an
   unverified certificate - web PKI, MTA-STS or a TLSA mismatch - no
   REQUIRETLS), it is permanent: the message is
   bounced, not retried for days (§4.2.1: no other path is allowed, and the
   sender must learn it). Status 5.7.30 "REQUIRETLS support required" when the
   server lacks the extension, 5.7.10 "encryption needed" otherwise (§4.2.1,
   §6). Temporary problems (unreachable, timeouts, a TLS handshake that broke,
   DNS) stay temporary; the next MX is tried either way, and a delivery where
   any host failed temporarily is retried (``smtp_transport._failure``).
   A bounce itself (null reverse-path) is never made to fail permanently by
   REQUIRETLS: §5 says such a failure should not cause a non-delivery report
   to be discarded, and a failed bounce would be (no DSN for a DSN), so it
   stays deferred and is retried until the queue lifetime.

Local delivery (LMTP, Maildir) is final delivery on this machine (§4.4): none
of this applies (``lmtp=True``).

The MX names (§4.2.1 asks that they be authenticated, by DNSSEC or MTA-STS):
a ``dane`` requirement only exists for a host whose MX and address answers were
DNSSEC-secure (``[dns] trust_ad``, RFC 7672 §2.2), and an MTA-STS enforce match
only for a host the domain's policy lists (fetched over verified HTTPS, RFC 8461
§4.1; an unlisted host is refused before connecting), so under either the MX
name is authenticated even over unsigned DNS. Where a domain publishes neither,
``verify`` for the MX host name proves the server is that host, not that the
MX record was genuine: the remaining gap, documented in docs/tls.md (such mail
is still delivered, as the peers' REQUIRETLS tests expect).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container

from postillon.core.envelope import MailParams
from postillon.outbound.session_types import SessionError
from postillon.outbound.tls_policy import TlsRequirement

__all__ = [
    "NOT_OFFERED",
    "POLICY_FAILURES",
    "failure",
    "mail_params",
    "relax",
    "require",
    "requirement",
    "session_error",
]

SOURCE = "REQUIRETLS (RFC 8689)"
NOT_OFFERED = "requiretls-not-supported"  # the TlsCheck-style result label
# TLS results that are the server's answer, not an accident of the network: for a
# REQUIRETLS message these end delivery to that host for good.
POLICY_FAILURES: frozenset[str] = frozenset(
    {
        "starttls-not-supported",
        "starttls-refused",
        "not-verified",
        "no-certificate",
        "fingerprint-mismatch",
        "tlsa-mismatch",  # DANE (RFC 7672 §3)
        "certificate-host-mismatch",  # MTA-STS enforce, RFC 8460 result names
        "certificate-expired",
        "sts-webpki-invalid",
        NOT_OFFERED,
    }
)
# Modes TLS-Required: No relaxes (§4.2.2): anything stricter than opportunistic.
_RELAXED = frozenset({"encrypt", "verify", "fingerprint", "dane"})


def requirement(
    base: TlsRequirement, mx_host: str, params: MailParams, *, lmtp: bool = False
) -> TlsRequirement:
    """What a connection to ``mx_host`` must prove for a message with ``params``
    (steps 0 and 1 of the note on one requirement)."""
    return require(relax(base, params, lmtp=lmtp), mx_host, params, lmtp=lmtp)


def relax(base: TlsRequirement, params: MailParams, *, lmtp: bool = False) -> TlsRequirement:
    """Step 0: ``TLS-Required: No`` (§4.2.2) makes the table's requirement
    opportunistic and final (no DANE or MTA-STS for this message); REQUIRETLS on
    MAIL overrides the header (§4.1)."""
    if lmtp or params.requiretls or not params.tls_required_no or base.mode == "none":
        return base
    mode = "opportunistic" if base.mode in _RELAXED else base.mode
    return TlsRequirement(mode, source=f"TLS-Required: No ({base.source})", final=True)


def require(
    decided: TlsRequirement, mx_host: str, params: MailParams, *, lmtp: bool = False
) -> TlsRequirement:
    """Step 1: a REQUIRETLS message needs an authenticated server (§4.2.1)."""
    if lmtp or not params.requiretls:
        return decided  # lmtp: final delivery on this machine (§4.4)
    if decided.authenticated:
        return dataclasses.replace(decided, requiretls=True)
    return TlsRequirement("verify", match=(mx_host,), requiretls=True, source=SOURCE)


def session_error(req: TlsRequirement, extensions: Container[str]) -> SessionError | None:
    """After the EHLO on the finished TLS session: None, or why not this server."""
    if not req.requiretls or "REQUIRETLS" in extensions:
        return None
    return SessionError(
        "the server does not offer REQUIRETLS",
        status="5.7.30",
        permanent=True,
        tls_result=NOT_OFFERED,
    )


def failure(req: TlsRequirement, exc: SessionError, *, null_sender: bool) -> SessionError:
    """The error to record for a failed attempt: ``exc``, or, when ``req`` is a
    REQUIRETLS requirement and the server's TLS was the reason, a permanent 5.7.x
    (a temporary 4.7.x for a bounce, see the note above)."""
    if not req.requiretls or exc.tls_result not in POLICY_FAILURES:
        return exc
    minor = "7.30" if exc.tls_result == NOT_OFFERED else "7.10"
    reason = exc.detail
    if exc.reply is not None:
        reason = f"{reason}: {exc.reply.code} {' '.join(exc.reply.lines)}"
    return SessionError(
        f"REQUIRETLS: {reason}"[:400],
        status=("4." if null_sender else "5.") + minor,
        permanent=not null_sender,
        tls_result=exc.tls_result,
    )


def mail_params(params: MailParams, req: TlsRequirement) -> MailParams:
    """The parameters for our MAIL: REQUIRETLS only on a REQUIRETLS connection
    (never to LMTP, never after TLS-Required: No, where ``req`` does not ask for it)."""
    if params.requiretls == req.requiretls:
        return params
    return dataclasses.replace(params, requiretls=req.requiretls)
