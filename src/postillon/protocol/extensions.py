"""The EHLO/LHLO extension list, computed from the settings and the TLS state."""

from __future__ import annotations

from postillon.protocol.settings import ServerSettings


def ehlo_keywords(settings: ServerSettings, *, tls_active: bool) -> list[str]:
    """Keywords advertised after the greeting line, in a stable order."""
    size = settings.max_message_size
    keywords = [
        "PIPELINING",  # RFC 2920 (LMTP requires it: RFC 2033 §4.1)
        f"SIZE {size}" if size else "SIZE",  # RFC 1870: bare SIZE = no fixed limit
        "8BITMIME",  # RFC 6152
        "ENHANCEDSTATUSCODES",  # RFC 2034
    ]
    if settings.smtputf8:
        keywords.append("SMTPUTF8")  # RFC 6531
    if settings.chunking:
        keywords.append("CHUNKING")  # RFC 3030
    if settings.dsn:
        keywords.append("DSN")  # RFC 3461
    if settings.limits:
        limits = limits_keyword(settings)
        if limits:
            keywords.append(limits)  # RFC 9422
    if settings.mt_priority and not settings.lmtp:
        keywords.append("MT-PRIORITY")  # RFC 6710 (honoured from trusted senders only)
    if settings.requiretls and tls_active and not settings.lmtp:
        # RFC 8689 §2: advertised only after TLS is up (STARTTLS done or implicit TLS).
        keywords.append("REQUIRETLS")
    if settings.starttls and not tls_active:
        keywords.append("STARTTLS")  # RFC 3207
    if settings.auth_mechanisms:
        keywords.append("AUTH " + " ".join(settings.auth_mechanisms))  # RFC 4954
    return keywords


def limits_keyword(settings: ServerSettings) -> str:
    """RFC 9422 ``LIMITS RCPTMAX=n MAILMAX=m``, with only the limits that are set
    ("" when none is)."""
    pairs = [
        f"{name}={value}"
        for name, value in (
            ("RCPTMAX", settings.max_recipients),
            ("MAILMAX", settings.max_transactions),
        )
        if value
    ]
    return "LIMITS " + " ".join(pairs) if pairs else ""
