"""DKIM verification (RFC 6376) of every signature on a message, with dkimpy.

Blocking (hashing, RSA/Ed25519, key lookups through :class:`BlockingDns`):
run it in a worker thread. Each ``DKIM-Signature`` field gets its own
result (RFC 8601 §2.7.1): ``pass``; ``fail`` (the signature does not match);
``permerror`` (malformed signature, missing or unusable key); ``temperror``
(the key lookup failed temporarily); ``none`` when the message is unsigned.
"""

from __future__ import annotations

import logging
import re

import dkim

from postillon.checks.authresults import MethodResult
from postillon.checks.blocking_dns import BlockingDns
from postillon.checks.dkim_speedups import install as install_speedups
from postillon.routing.resolver import DnsTempError

# RFC 8301 §3.2: verifiers MUST NOT consider keys shorter than 1024 bits valid.
MIN_RSA_BITS = 1024
KEY_LOOKUP_TIMEOUT = 5

_quiet = logging.getLogger("postillon.checks.dkim")
install_speedups()
_TAG = re.compile(rb"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)", re.IGNORECASE)


def dkim_dnsfunc(bridge: BlockingDns) -> object:
    """dkimpy's ``dnsfunc(name, timeout=5) -> bytes | None`` over our resolver."""

    def lookup(name: bytes | str, timeout: float = KEY_LOOKUP_TIMEOUT) -> bytes | None:
        text = name.decode("ascii", errors="replace") if isinstance(name, bytes) else name
        try:
            records = bridge.txt(text)
        except DnsTempError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        # RFC 6376 §3.6.2.2: the strings of one record are concatenated; with
        # several records the result is undefined: take the first.
        return b"".join(records[0]) if records else None

    return lookup


def _tags(value: bytes) -> dict[bytes, bytes]:
    unfolded = b"".join(value.split())  # no whitespace at all (bytes.split: \s in C)
    return {m.group(1).lower(): m.group(2) for m in _TAG.finditer(unfolded)}


def signature_fields(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature field, top first (for results and DMARC)."""
    end = message.find(b"\r\n\r\n")  # the header section, without copying the body
    header = message if end < 0 else message[:end]
    out = []
    for match in re.finditer(
        rb"(?im)^dkim-signature[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", header
    ):
        out.append(_tags(match.group(1)))
    return out


def verify_dkim(
    bridge: BlockingDns,
    message: bytes,
    signatures: list[dict[bytes, bytes]] | None = None,
) -> list[MethodResult]:
    """One result per signature; ``[dkim=none]`` for an unsigned message.

    ``signatures``: ``signature_fields(message)`` when the caller already has it.
    """
    if signatures is None:
        signatures = signature_fields(message)
    if not signatures:
        return [MethodResult("dkim", "none", "message not signed")]
    verifier = dkim.DKIM(message, logger=_quiet, minkey=MIN_RSA_BITS, timeout=KEY_LOOKUP_TIMEOUT)
    lookup = dkim_dnsfunc(bridge)
    results = []
    for index, tags in enumerate(signatures):
        domain = tags.get(b"d", b"").decode("ascii", errors="replace").lower()
        selector = tags.get(b"s", b"").decode("ascii", errors="replace")
        props = (
            ("header.d", domain),
            ("header.s", selector),
            ("header.a", tags.get(b"a", b"").decode("ascii", errors="replace")),
            # RFC 6008: the first characters of b= tell signatures apart.
            ("header.b", tags.get(b"b", b"")[:8].decode("ascii", errors="replace")),
        )
        key_name = f"{selector}._domainkey.{domain}"
        try:
            ok = bool(verifier.verify(index, dnsfunc=lookup))
        except dkim.ValidationError as exc:
            # The body changed after signing: the signature fails (RFC 6376 3.7),
            # anything else wrong with the fields is a permanent error.
            verdict = "fail" if "body hash mismatch" in str(exc) else "permerror"
            why = "body hash did not verify" if verdict == "fail" else str(exc)[:120]
            results.append(MethodResult("dkim", verdict, why, props))
            continue
        except dkim.DKIMException as exc:
            results.append(MethodResult("dkim", "permerror", str(exc)[:120], props))
            continue
        except Exception as exc:  # a library bug must not take the session down
            results.append(
                MethodResult("dkim", "permerror", f"verifier error: {exc!r}"[:120], props)
            )
            continue
        if ok:
            results.append(MethodResult("dkim", "pass", "", props))
        elif bridge.temp_failed(key_name):
            results.append(MethodResult("dkim", "temperror", "key lookup failed", props))
        elif key_name.lower() in bridge.missing:
            results.append(MethodResult("dkim", "permerror", "no key for signature", props))
        else:
            results.append(MethodResult("dkim", "fail", "signature did not verify", props))
    return results
