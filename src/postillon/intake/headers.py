"""Trace headers that intake adds (RFC 5321 §4.4, RFC 3848 protocol names)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from email.utils import formatdate


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who handed us the message; written into Received: and the mail log."""

    ip: str = ""
    helo: str = ""
    rdns: str = ""  # reverse DNS name if known (and forward-confirmed)
    esmtp: bool = True
    tls: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; empty when plaintext
    authenticated: bool = False
    trusted: bool = False  # from [relay] trusted_networks (MT-PRIORITY is honoured)
    smtputf8: bool = False
    lmtp: bool = False
    listener: str = ""
    hide_ip: bool = False  # submission may keep the client's IP out of headers

    @property
    def protocol(self) -> str:
        """RFC 3848 / RFC 6531 "with" keyword."""
        if self.lmtp:
            return "LMTPS" if self.tls else "LMTP"
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.smtputf8 else "ESMTP"
        return base + ("S" if self.tls else "") + ("A" if self.authenticated else "")

    def describe(self) -> str:
        """``helo (rdns [ip])`` as in a Received: from clause and the log."""
        if self.hide_ip:
            return self.helo or "unknown"
        inner = f"{self.rdns or 'unknown'} [{self.ip}]" if self.ip else "local"
        return f"{self.helo or 'unknown'} ({inner})"


@functools.lru_cache(maxsize=4)  # one formatting per second, not per message
def _rfc5322_date(second: int) -> str:
    """RFC 5322 date-time in GMT, whole seconds (what formatdate writes anyway)."""
    return formatdate(second, localtime=False, usegmt=True)


def received_header(
    client: ClientInfo, hostname: str, queue_id: str, recipient: str | None, when: float
) -> bytes:
    """The Received: line we prepend, folded, CRLF-terminated."""
    lines = [f"Received: from {client.describe()}"]
    if client.tls:
        lines.append(f"\t(using {client.tls})")
    by = f"\tby {hostname} (postillon) with {client.protocol} id {queue_id}"
    if recipient:
        lines.append(by)
        lines.append(f"\tfor <{recipient}>; {_rfc5322_date(int(when))}")
    else:
        lines.append(f"{by}; {_rfc5322_date(int(when))}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
