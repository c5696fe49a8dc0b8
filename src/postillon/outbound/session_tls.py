"""What a delivery says about its session's TLS: the log line's relay text and the
structured :class:`~postillon.core.outcome.TlsDetails` kept with each outcome (mail
log, message history, the admin page's per-recipient view).

Both are made from the same three things: the host tried, the session (None when
the host was refused before connecting or the connection failed) and the
requirement that applied (a ``HostRefused`` when the policy refused the host).
"""

from __future__ import annotations

from postillon.core.outcome import TlsDetails
from postillon.outbound.client_session import SmtpClientSession
from postillon.outbound.session_types import SessionError
from postillon.outbound.tls import AUTHENTICATED_RESULTS
from postillon.outbound.tls_policy import HostRefused, TlsRequirement

__all__ = ["describe", "policy_label", "tls_details"]


def policy_label(req: TlsRequirement | HostRefused) -> str:
    """The policy as an operator names it (see ``TlsDetails.policy``)."""
    if isinstance(req, TlsRequirement):
        if req.mode == "dane":
            return "dane"
        if req.sts == "enforce":
            return "mta-sts"
        if req.sts == "testing":
            return "mta-sts-testing"
        return req.mode
    if req.sts_policy:  # refused by an MTA-STS enforce policy
        return "mta-sts"
    return req.mode


def tls_details(
    host: str,
    address: str,
    session: SmtpClientSession | None,
    req: TlsRequirement | HostRefused,
    error: SessionError | None = None,
) -> TlsDetails:
    """The TLS of one host attempt. ``error``: why a connection failed, when there
    is no session to ask (its ``tls_result`` and ``tls`` when it failed its TLS
    policy after the handshake)."""
    policy = policy_label(req)
    if isinstance(req, HostRefused):
        return TlsDetails(host, address, policy, req.result, False)
    if session is not None:
        tls = session.tls
        result = session.tls_result if tls else "plaintext"
    elif error is not None and error.tls_result:
        tls, result = error.tls, error.tls_result
    else:
        return TlsDetails(host, address, policy, "no-connection", False)
    if not tls:
        return TlsDetails(host, address, policy, result, False)
    version, _, cipher = tls.partition(" ")
    return TlsDetails(
        host, address, policy, result, result in AUTHENTICATED_RESULTS, version, cipher
    )


def describe(
    host: str,
    address: str,
    port: int,
    session: SmtpClientSession | None,
    req: TlsRequirement | HostRefused,
) -> str:
    """The host, the TLS result and the policy, for the delivery log line:
    ``mx.example[192.0.2.1]:25 tls=TLSv1.3/verified policy=verify``,
    ``... tls=TLSv1.3/dane-ee policy=dane``, ``... policy=verify mta-sts=enforce``,
    ``... policy=verify+requiretls``."""
    where = host if not address else f"{host}[{address}]:{port}"
    policy = f"policy={req.mode}"
    if isinstance(req, TlsRequirement):
        policy += ("+requiretls" if req.requiretls else "") + (
            f" mta-sts={req.sts}" if req.sts else ""
        )
    if session is not None and session.tls:
        return f"{where} tls={session.tls.split()[0]}/{session.tls_result} {policy}"
    if session is not None:
        return f"{where} tls=none {policy}"
    return f"{where} {policy}"
