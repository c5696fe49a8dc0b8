"""Replies the protocol core sends by itself.

Short and generic, each with an enhanced status code (RFC 3463); details go to
the log through ``CommandRejected``, never back to the client. Replies shared
with other rooms live in ``core/reply.py`` and are re-exported here so tests can
name every reply the core may send from one module.
"""

from __future__ import annotations

from postillon.core.reply import (
    BAD_SEQUENCE,
    BARE_LINE_ENDING,
    LINE_TOO_LONG,
    NUL_NOT_ALLOWED,
    OK,
    PARAM_SYNTAX,
    SERVICE_CLOSING,
    SYNTAX_ERROR,
    TOO_MANY_ERRORS,
    Reply,
)

__all__ = [
    "AUTH_ALREADY",
    "AUTH_CANCELLED",
    "AUTH_ENCRYPTION_REQUIRED",
    "AUTH_FAILED",
    "AUTH_MALFORMED",
    "AUTH_REQUIRED",
    "AUTH_SUCCEEDED",
    "AUTH_TOO_MANY_FAILURES",
    "AUTH_UNAVAILABLE",
    "AUTH_UNKNOWN_MECHANISM",
    "BAD_PARAM",
    "BAD_PARAM_VALUE",
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "BAD_SEQUENCE",
    "BARE_LINE_ENDING",
    "BDAT_SYNTAX",
    "BODY_BARE_LINE_ENDING",
    "BODY_NUL",
    "DATA_AFTER_BDAT",
    "EXPN_DISABLED",
    "HELLO_SYNTAX",
    "HELP",
    "INVALID_UTF8",
    "IN_TRANSACTION",
    "LINE_TOO_LONG",
    "MESSAGE_TOO_BIG",
    "NEEDS_SMTPUTF8",
    "NEED_HELLO",
    "NEED_LHLO",
    "NEED_MAIL",
    "NEED_RCPT",
    "NESTED_MAIL",
    "NOT_IMPLEMENTED",
    "NO_VALID_RECIPIENTS",
    "NUL_NOT_ALLOWED",
    "OK",
    "PARAM_SYNTAX",
    "REQUIRETLS_NEEDS_TLS",
    "REQUIRETLS_UNSUPPORTED",
    "SERVICE_CLOSING",
    "SYNTAX_ERROR",
    "TLS_ALREADY_ACTIVE",
    "TOO_MANY_ERRORS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MANY_TRANSACTIONS",
    "USE_LHLO",
    "VRFY_CANNOT",
    "chunk_received",
]

# Sequence (RFC 5321 §4.1.4, §4.3.2).
NEED_HELLO = Reply.of(503, "5.5.1", "Send EHLO or HELO first")
NEED_LHLO = Reply.of(503, "5.5.1", "Send LHLO first")
NESTED_MAIL = Reply.of(503, "5.5.1", "Nested MAIL command")
NEED_MAIL = Reply.of(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply.of(503, "5.5.1", "Need RCPT command")  # LMTP DATA (RFC 2033 §4.2)
NO_VALID_RECIPIENTS = Reply.of(554, "5.5.1", "No valid recipients")
DATA_AFTER_BDAT = Reply.of(503, "5.5.1", "DATA and BDAT cannot be mixed (RFC 3030)")
IN_TRANSACTION = Reply.of(503, "5.5.1", "Not allowed during a mail transaction")
TLS_ALREADY_ACTIVE = Reply.of(503, "5.5.1", "TLS already active")
NOT_IMPLEMENTED = Reply.of(502, "5.5.1", "Command not implemented")
USE_LHLO = Reply.of(500, "5.5.1", "Use LHLO in LMTP")

# Syntax.
INVALID_UTF8 = Reply.of(500, "5.5.2", "Invalid UTF-8 in command")
HELLO_SYNTAX = Reply.of(501, "5.5.4", "Syntax: EHLO hostname")
BDAT_SYNTAX = Reply.of(501, "5.5.4", "Syntax: BDAT size [LAST]")
BAD_SENDER = Reply.of(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply.of(501, "5.1.3", "Bad recipient address syntax")
NEEDS_SMTPUTF8 = Reply.of(553, "5.6.7", "Non-ASCII address requires SMTPUTF8 (RFC 6531)")
BAD_PARAM = Reply.of(555, "5.5.4", "Unsupported or malformed parameter")
# A well-formed xtext whose decoded value holds control characters (e.g.
# "+0D+0A"): it would end up in a DSN or a log line (RFC 3461 §4.2, §4.4).
BAD_PARAM_VALUE = Reply.of(501, "5.5.4", "Parameter value must be printable US-ASCII")

# Limits.
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipients")
# RFC 9422 MAILMAX: more transactions than the session allows; reconnect for more.
TOO_MANY_TRANSACTIONS = Reply.of(
    451, "4.5.3", "Too many transactions in this session, open a new connection"
)

# Message content (RFC 5321 §2.3.8, §4.1.1.4: lines end with CRLF, nothing else).
BODY_BARE_LINE_ENDING = Reply.of(
    550, "5.6.0", "Message refused: bare CR or LF not allowed, lines end with CRLF (RFC 5321 2.3.8)"
)
BODY_NUL = Reply.of(550, "5.6.0", "Message refused: NUL character not allowed")

# Informational commands: no user enumeration (RFC 5321 §3.5.3, §7.3).
VRFY_CANNOT = Reply.of(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
EXPN_DISABLED = Reply.of(502, "5.5.1", "EXPN not available")
HELP = Reply.of(
    214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT"
)

# AUTH (RFC 4954 §4, §6; RFC 6409 §4.3 for submission).
AUTH_UNKNOWN_MECHANISM = Reply.of(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_UNAVAILABLE = Reply.of(454, "4.7.0", "Temporary authentication failure")
AUTH_ENCRYPTION_REQUIRED = Reply.of(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_ALREADY = Reply.of(503, "5.5.1", "Already authenticated")
AUTH_REQUIRED = Reply.of(530, "5.7.0", "Authentication required")
# RFC 8689 §2: MAIL ... REQUIRETLS on a session without TLS (X.7.10 "Encryption
# needed", RFC 5248; 530 as for a command that needs a security step first).
REQUIRETLS_NEEDS_TLS = Reply.of(530, "5.7.10", "REQUIRETLS needs a TLS session (STARTTLS first)")
# RFC 8689 §4.2.1 / §6: the client's own refusal when the message requires TLS
# and the server does not offer REQUIRETLS (X.7.30 "REQUIRETLS support required").
REQUIRETLS_UNSUPPORTED = Reply.of(550, "5.7.30", "REQUIRETLS support required; not offered")
AUTH_SUCCEEDED = Reply.of(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply.of(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply.of(501, "5.0.0", "Authentication cancelled")
AUTH_MALFORMED = Reply.of(501, "5.5.2", "Malformed authentication response")
AUTH_TOO_MANY_FAILURES = Reply.of(421, "4.7.0", "Too many authentication failures, try later")


def chunk_received(size: int) -> Reply:
    """The core's answer to a non-LAST BDAT chunk (RFC 3030 §2)."""
    return Reply.of(250, "2.0.0", f"{size} octets received")
