"""ARC (RFC 8617): verify the chain on inbound mail, seal mail we forward.

Verification uses dkimpy's ``arc_verify`` (with ``dkim_speedups``) and key lookups
through :class:`BlockingDns`; blocking, so it runs in a worker thread. Only mail that
carries ARC sets pays for it; DKIM itself is verified by ``dkimcore``. The result is
``arc=none|pass|fail`` (RFC 8617 §4.4) with the sealing domain of the newest
set, and the newest ARC-Authentication-Results, so local policy may trust a
known forwarder's earlier DMARC verdict (§7.2).

Sealing (§5.1) adds a new ARC set (AAR, AMS, AS) for a forwarding domain,
built from our own Authentication-Results (``authserv_id`` = our hostname),
which must already be in the message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from postillon.checks.authresults import MethodResult
from postillon.checks.blocking_dns import BlockingDns
from postillon.dkimcore.tags import MIN_RSA_BITS
from postillon.dns.resolver import DnsTempError

# dkimpy's key lookups time out after this many seconds.
KEY_LOOKUP_TIMEOUT = 5

_quiet = logging.getLogger("postillon.checks.arc")


def _dkim() -> ModuleType:
    """dkimpy, with postillon's speed-ups installed: imported for the first message with
    ARC fields, or the first seal, not at start (it brings dnspython's resolver, PyNaCl and
    cryptography: bench/README.md, "Memory"). The standard library modules it needs are
    imported by then (tests/integration/test_memory_footprint.py)."""
    import dkim

    from postillon.checks.dkim_speedups import install

    install()  # idempotent
    module: ModuleType = dkim
    return module


_ARC_FIELD = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:")
_ARC_NAMES = frozenset((b"arc-seal", b"arc-message-signature", b"arc-authentication-results"))
_HEADER_FROM = re.compile(r"header\.from=([^\s;()]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ArcOutcome:
    clause: MethodResult
    sealer: str = ""  # d= of the newest ARC-Seal
    instance: int = 0
    # The newest AAR's dmarc verdict and header.from ("" when absent).
    sealed_dmarc: str = ""
    sealed_from: str = ""


def dkim_dnsfunc(bridge: BlockingDns) -> object:
    """dkimpy's ``dnsfunc(name, timeout=5) -> bytes | None`` over our resolver."""

    def lookup(name: bytes | str, timeout: float = KEY_LOOKUP_TIMEOUT) -> bytes | None:
        text = name.decode("ascii", errors="replace") if isinstance(name, bytes) else name
        try:
            records = bridge.txt(text)
        except DnsTempError as exc:
            raise _dkim().DnsTimeoutError(str(exc)) from None
        # RFC 6376 §3.6.2.2: the strings of one record are concatenated; with several
        # records the result is undefined: take the first.
        return b"".join(records[0]) if records else None

    return lookup


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value) if value is not None else ""


def has_arc_fields(fields: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a parsed header section carries any ARC field (RFC 8617 §4.1)."""
    return any(name.lower().rstrip() in _ARC_NAMES for name, _ in fields)


def has_arc_headers(header: bytes) -> bool:
    """Cheap test before the verifier parses the whole message again."""
    return _ARC_FIELD.search(header) is not None


def verify_arc(bridge: BlockingDns, message: bytes) -> ArcOutcome:
    if not has_arc_headers(message.split(b"\r\n\r\n", 1)[0]):
        return ArcOutcome(MethodResult("arc", "none"))
    try:
        cv, results, reason = _dkim().arc_verify(
            message, logger=_quiet, dnsfunc=dkim_dnsfunc(bridge), minkey=MIN_RSA_BITS
        )
    except Exception as exc:  # malformed chains must not take the session down
        return ArcOutcome(MethodResult("arc", "fail", f"ARC verifier error: {exc!r}"[:120]))
    verdict = _as_text(cv).lower() or "fail"
    if verdict == "none" or not results:
        return ArcOutcome(MethodResult("arc", "none" if verdict == "none" else verdict))
    newest = max(results, key=lambda r: int(r.get("instance", 0)))
    sealer = _as_text(newest.get("as-domain")).lower()
    instance = int(newest.get("instance", 0))
    aar = _as_text(newest.get("aar-value"))
    dmarc = re.search(r"\bdmarc=([a-z]+)", aar, re.IGNORECASE)
    header_from = _HEADER_FROM.search(aar)
    props = (("header.oldest-pass", "0"),) if verdict == "pass" else ()
    comment = f"i={instance} d={sealer}" + ("" if verdict == "pass" else f"; {reason}"[:100])
    return ArcOutcome(
        MethodResult("arc", verdict, comment, props),
        sealer=sealer,
        instance=instance,
        sealed_dmarc=dmarc.group(1).lower() if dmarc else "",
        sealed_from=header_from.group(1).lower().strip('"') if header_from else "",
    )


def arc_seal(
    message: bytes, selector: str, domain: str, private_key_pem: bytes, authserv_id: str
) -> bytes:
    """The new ARC set as header bytes to prepend ("" when there is nothing to seal).

    Raises ``dkim.DKIMException`` for an unusable key or message.
    """
    fields = _dkim().arc_sign(
        message,
        selector.encode("ascii"),
        domain.encode("ascii"),
        private_key_pem,
        authserv_id.encode("ascii"),
        logger=_quiet,
    )
    return b"".join(fields)
