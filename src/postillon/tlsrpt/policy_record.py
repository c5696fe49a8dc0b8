"""The ``_smtp._tls`` TXT record (RFC 8460 §3): where a domain wants its reports.

Pure: TXT strings in, a value out. RFC 8460 §3:

* only records starting with ``v=TLSRPTv1`` count; "if the number of resulting
  records is not one, senders MUST assume the recipient domain does not
  implement TLSRPT" (two records: no report);
* fields are ``key=value`` separated by ``;`` (with optional white space); a
  trailing ``;`` is allowed; unknown fields are ignored (a superset of the spec);
* ``rua=`` is required: one or more URIs separated by ``,``; postillon sends to
  ``mailto:`` (§5.3) and ``https:`` (§5.2) URIs and ignores other schemes.

A record that breaks this grammar yields :class:`NoTlsRpt` with the reason, for
the log: no report is sent to a destination we had to guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = ["NoTlsRpt", "TlsRptRecord", "parse_records", "record_name"]

_VERSION: Final = "v=TLSRPTv1"
_FIELD: Final = re.compile(r"^([A-Za-z0-9_.-]+)=(.*)$", re.DOTALL)
# RFC 5322 addr-spec, loosely: something@domain with no spaces or brackets.
_ADDRESS: Final = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9.-]+\.?$")


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """The domain's reporting addresses: ``mailto`` addresses and ``https`` URLs."""

    mailto: tuple[str, ...]
    https: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoTlsRpt:
    """No reports for this domain, and why (for the log)."""

    reason: str


def record_name(domain: str) -> str:
    """RFC 8460 §3: the TXT record lives at ``_smtp._tls.<domain>``."""
    return f"_smtp._tls.{domain.rstrip('.')}"


def parse_records(texts: Sequence[str]) -> TlsRptRecord | NoTlsRpt:
    """The TXT records at ``_smtp._tls.DOMAIN`` (each its strings joined) → the record."""
    # A record is a TLSRPT record when it begins with the version field (§3).
    candidates = [t for t in texts if _first_field(t) == _VERSION]
    if not candidates:
        return NoTlsRpt("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        return NoTlsRpt(f"{len(candidates)} v=TLSRPTv1 records (RFC 8460 §3: exactly one)")
    return _parse(candidates[0])


def _first_field(text: str) -> str:
    return text.split(";", 1)[0].strip()


def _parse(text: str) -> TlsRptRecord | NoTlsRpt:
    parts = [p.strip(" \t") for p in text.split(";")]
    if parts and parts[-1] == "":  # one trailing delimiter is allowed
        parts.pop()
    rua: str | None = None
    for part in parts[1:]:
        match = _FIELD.match(part)
        if match is None:
            return NoTlsRpt(f"malformed field {part[:60]!r}")
        key, value = match.groups()
        if key == "rua":
            if rua is not None:
                return NoTlsRpt("rua= given twice")
            rua = value
    if rua is None:
        return NoTlsRpt("no rua= field")
    mailto: list[str] = []
    https: list[str] = []
    for uri in (u.strip(" \t") for u in rua.split(",")):
        scheme, _, rest = uri.partition(":")
        if not rest:
            return NoTlsRpt(f"malformed rua URI {uri[:80]!r}")
        scheme = scheme.lower()
        if scheme == "mailto":
            address = unquote(rest.split("?", 1)[0])
            if not _ADDRESS.match(address):
                return NoTlsRpt(f"malformed rua address {uri[:80]!r}")
            mailto.append(address)
        elif scheme == "https":
            parsed = urlsplit(uri)
            if not parsed.hostname or any(c.isspace() for c in uri):
                return NoTlsRpt(f"malformed rua URL {uri[:80]!r}")
            https.append(uri)
        # other schemes: not ours to send to (ignored, as unknown extensions are)
    if not mailto and not https:
        return NoTlsRpt(f"no mailto: or https: destination in rua={rua[:80]!r}")
    return TlsRptRecord(tuple(mailto), tuple(https))
