"""DKIM verification (RFC 6376) of every signature on a message.

The verifier is :mod:`postillon.dkimcore` (sans-IO: hashing and signatures only); this
check fetches the keys through postillon's resolver first, on the event loop, all at
once, then verifies with those answers. Each ``DKIM-Signature`` field gets its own result
(RFC 8601 §2.7.1): ``pass``; ``fail`` (the signature does not match); ``permerror``
(malformed signature, missing or unusable key); ``temperror`` (the key lookup failed
temporarily); ``none`` when the message is unsigned.

With helper processes (``helper_processes``, see ``postillon.helpers`` and
``dkimcore/remote.py``) the message and its prefetched keys go to one of them. Without
them, or when none answers, small messages are verified inline (a few hundred
microseconds, less than a hand-off to a worker thread costs); above
:data:`INLINE_VERIFY_BYTES` the hashing runs in a worker thread (``hashlib`` releases the
GIL), so a large message never stalls other sessions.

Above ``[authentication] max_arc_size`` the message is never read whole:
:func:`verify_dkim_streamed` parses the header section, hashes the body from the spool
chunk by chunk in a worker thread (``dkimcore/body_stream.py``), then checks each
signature against those hashes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from postillon.checks.authresults import MethodResult
from postillon.checks.blocking_dns import BlockingDns
from postillon.dkimcore.body_stream import BodyHashes, DigestKey
from postillon.dkimcore.canonical import Field, HeaderFormatError, header_fields, split_message
from postillon.dkimcore.remote import KeyAnswer, ResultRow
from postillon.dkimcore.verify import (
    KeyUnavailable,
    Result,
    Signature,
    body_hash_keys,
    key_names,
    parse_signatures,
    verify_signatures,
    verify_with_digests,
)
from postillon.dns.resolver import DnsTempError, Resolver
from postillon.helpers.pool import HelperPool

# Above this many bytes of message, hashing moves to a worker thread.
INLINE_VERIFY_BYTES = 256 * 1024


class ParsedMessage:
    """A message split for the checks: its header fields and signatures, parsed once."""

    def __init__(self, message: bytes) -> None:
        header, self.body = split_message(message)
        self.size = len(message)
        self.problem = ""
        try:
            self.fields: list[Field] = header_fields(header)
        except HeaderFormatError as exc:
            self.fields = []
            self.problem = str(exc)
        self.signatures: list[Signature] = parse_signatures(self.fields)

    @property
    def key_names(self) -> list[str]:
        return [s.key_name for s in self.signatures if s.key_name]


def prefetched_keys(bridge: BlockingDns) -> Callable[[str], bytes | None]:
    """The key lookup for :mod:`dkimcore`, answered from what ``bridge`` prefetched."""

    def lookup(name: str) -> bytes | None:
        try:
            records = bridge.prefetched_txt(name)
        except DnsTempError as exc:
            raise KeyUnavailable(exc.reason) from None
        except KeyError:
            raise KeyUnavailable("key not fetched") from None
        # RFC 6376 §3.6.2.2: the strings of one record are concatenated; with several
        # records the result is undefined: take the first.
        return b"".join(records[0]) if records else None

    return lookup


def _method_result(outcome: Result) -> MethodResult:
    sig = outcome.signature
    props = (
        ("header.d", sig.domain),
        ("header.s", sig.selector),
        ("header.a", sig.tag(b"a")),
        # RFC 6008: the first characters of b= tell signatures apart.
        ("header.b", "".join(sig.tag(b"b").split())[:8]),
    )
    return MethodResult("dkim", outcome.result, outcome.reason, props)


def _verify(parsed: ParsedMessage, lookup: Callable[[str], bytes | None]) -> list[MethodResult]:
    outcomes = verify_signatures(parsed.fields, parsed.body, parsed.signatures, lookup)
    return [_method_result(o) for o in outcomes]


async def verify_dkim(parsed: ParsedMessage, bridge: BlockingDns) -> list[MethodResult]:
    """One result per signature; ``[dkim=none]`` for an unsigned message. The keys must
    have been prefetched through ``bridge`` (``parsed.key_names``)."""
    if parsed.problem:
        return [MethodResult("dkim", "permerror", f"unparseable header: {parsed.problem}"[:120])]
    if not parsed.signatures:
        return [MethodResult("dkim", "none", "message not signed")]
    lookup = prefetched_keys(bridge)
    if parsed.size <= INLINE_VERIFY_BYTES:
        return _verify(parsed, lookup)
    return await asyncio.to_thread(_verify, parsed, lookup)


def dkim_key_names(header: bytes) -> list[str]:
    """The keys a message's signatures need (to fetch them before verifying)."""
    return key_names(header)


def _keys_to_send(bridge: BlockingDns, names: list[str]) -> dict[str, KeyAnswer]:
    """The prefetched key records, in the form a helper process takes (see dkimcore.remote)."""
    keys: dict[str, KeyAnswer] = {}
    for name in names:
        try:
            records = bridge.prefetched_txt(name)
        except DnsTempError as exc:
            keys[name] = exc.reason or "temporary DNS failure"
        except KeyError:
            continue  # not fetched: the worker answers None, the message is verified here
        else:
            keys[name] = b"".join(records[0]) if records else None
    return keys


def _row_result(row: ResultRow) -> MethodResult:
    result, reason, domain, selector, algorithm, b_prefix = row
    props = (
        ("header.d", domain),
        ("header.s", selector),
        ("header.a", algorithm),
        ("header.b", b_prefix),
    )
    return MethodResult("dkim", result, reason, props if domain else ())


async def verify_dkim_message(
    message: bytes,
    names: list[str],
    bridge: BlockingDns,
    helpers: HelperPool | None,
) -> list[MethodResult]:
    """Every signature's result: by a helper process when there are ``helpers``, else
    (or when none answers) here. ``names``: :func:`dkim_key_names`, prefetched."""
    if helpers is not None:
        rows = await helpers.call("verify", (message, _keys_to_send(bridge, names)))
        if rows is not None:
            return [_row_result(r) for r in rows] or [
                MethodResult("dkim", "none", "message not signed")
            ]
    parsed = ParsedMessage(message)
    unfetched = [name for name in parsed.key_names if name not in names]
    if unfetched:  # keys the quick scan did not find: fetch them now, not temperror
        await bridge.prefetch_txt(unfetched)
    return await verify_dkim(parsed, bridge)


async def verify_dkim_streamed(
    header: bytes,
    body: Callable[[], Iterable[bytes]],
    names: list[str],
    bridge: BlockingDns,
) -> list[MethodResult]:
    """Every signature's result for a message too large to hold in memory: the body
    hashes come from one pass over ``body()`` (the spool, chunk by chunk, in a worker
    thread: ``hashlib`` releases the GIL), then each signature is checked against them.
    ``header``: the header section; ``names``: :func:`dkim_key_names`, prefetched."""
    try:
        fields = header_fields(header)
    except HeaderFormatError as exc:
        return [MethodResult("dkim", "permerror", f"unparseable header: {exc}"[:120])]
    signatures = parse_signatures(fields)
    if not signatures:
        return [MethodResult("dkim", "none", "message not signed")]
    unfetched = [s.key_name for s in signatures if s.key_name and s.key_name not in names]
    if unfetched:
        await bridge.prefetch_txt(unfetched)
    keys = body_hash_keys(signatures)

    def hash_body() -> dict[DigestKey, bytes]:
        hashes = BodyHashes(keys)
        for chunk in body():
            hashes.update(chunk)
        return hashes.digests()

    try:
        digests = await asyncio.to_thread(hash_body) if keys else {}
    except OSError as exc:  # the spool could not be read back (intake logs spool faults)
        return [MethodResult("dkim", "temperror", f"message not readable: {exc}"[:120])]
    outcomes = verify_with_digests(fields, signatures, digests, prefetched_keys(bridge))
    return [_method_result(o) for o in outcomes]


async def check_dkim(resolver: Resolver, message: bytes) -> list[MethodResult]:
    """Fetch the keys and verify: the whole check for one message (tests, tools)."""
    parsed = ParsedMessage(message)
    bridge = BlockingDns(resolver, asyncio.get_running_loop())
    await bridge.prefetch_txt(parsed.key_names)
    return await verify_dkim(parsed, bridge)
