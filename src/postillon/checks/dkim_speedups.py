"""Faster, equivalent versions of two dkimpy hot spots, installed once.

Why: verifying an RSA-2048 and an Ed25519 signature on a 4 KiB message cost
about 1.1 ms of CPU in dkimpy 1.1, more than postillon's whole acceptance
path (about 1 ms a message). Two spots took most of it (cProfile, see
bench/README.md "Inbound authentication"):

* RSA verification in pure Python (``dkim.crypto.RSASSA_PKCS1_v1_5_verify``:
  big-int ``pow`` plus byte conversions). Replaced by OpenSSL through
  ``cryptography`` (already a dependency), with the parsed public key cached.
* The canonicalisation helpers ran a regular-expression substitution over
  the whole body and every header even when nothing changes; and
  ``compress_whitespace`` replaced every run of blanks, single spaces
  included (one substitution per word). Replaced by versions that first ask
  ``bytes.find`` (memchr speed) whether there is anything to change, and
  then only match runs that change; the output is byte-for-byte the same.

* Removing the b= value from the signature field before hashing it
  (``dkim.RE_BTAG``) tried folding whitespace before every base64
  character: about 40 us per RSA signature. ``FWS`` there can only match
  a (possibly empty) run of whitespace, so "any run of whitespace and
  base64 characters, up to its last base64 character" is the same match
  in one pass (4 us).

* ``dkim.rfc822_parse`` split the whole message into lines (body included)
  and joined the body lines again with CRLF. The header lines are split
  as before; the body is taken as is when its line ends are all CRLF
  already (the same bytes as the join).

* ``dkim.util.parse_tag_value`` (each signature, key record and ARC field)
  looked its tag-name regex up in ``re``'s cache for every tag; a tag name
  is valid exactly when its first byte is an ASCII letter, which
  ``bytes.isalpha`` answers directly.

* Every signature parsed its public key record again (base64 and a
  pure-Python ASN.1 walk for RSA). ``load_pk_from_dns`` still asks DNS each
  time (postillon's resolver caches by TTL), but the parsing of a record
  already seen is cached, keyed by the record's exact bytes.

All keep dkimpy's contracts (same arguments, same results; anything
unexpected falls back to dkimpy's own code). ``install()`` is idempotent.
tests/unit/test_dkim_speedups.py checks the equivalence.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_ORIGINAL_VERIFY: Callable[..., bool] = dkim.crypto.RSASSA_PKCS1_v1_5_verify
_ORIGINAL_COMPRESS: Callable[[bytes], bytes] = dkim.canonicalization.compress_whitespace
_ORIGINAL_STRIP: Callable[[bytes], bytes] = dkim.canonicalization.strip_trailing_whitespace
_ORIGINAL_UNFOLD: Callable[[bytes], bytes] = dkim.canonicalization.unfold_header_value

# Runs of blanks that relaxed canonicalisation changes: any run holding a tab,
# or two or more blanks. A single space already is its own canonical form.
_CHANGING_BLANKS = re.compile(rb"\t[\t ]*| [\t ]+")
_TRAILING_BLANKS = re.compile(rb"[\t ]+\r\n")
_LINE_BREAK = re.compile(rb"\r?\n")

_ORIGINAL_BTAG: re.Pattern[bytes] = dkim.RE_BTAG
_FWS = rb"(?:(?:\s*\r?\n)?\s+)?"
RE_BTAG = re.compile(rb"([;\s]b" + _FWS + rb"=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")

_ORIGINAL_PARSE: Callable[[bytes], Any] = dkim.rfc822_parse
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def rfc822_parse(message: Any) -> Any:
    """dkimpy's rfc822_parse: ([[name, value + CRLF], ...], body with CRLF line ends)."""
    if not isinstance(message, bytes):
        return _ORIGINAL_PARSE(message)
    end = _BLANK_LINE.search(message)
    if end is None or message[:1] == b"\n" or message[:2] == b"\r\n":
        return _ORIGINAL_PARSE(message)
    headers: list[list[bytes]] = []
    for line in _LINE_BREAK.split(message[: end.start()]):
        if line[:1] in (b"\t", b" "):
            headers[-1][1] += line + b"\r\n"
        else:
            m = _HEADER_NAME.match(line)
            if m is not None:
                headers.append([m.group(1), line[m.end(0) :] + b"\r\n"])
            elif line.startswith(b"From "):
                pass
            else:
                return _ORIGINAL_PARSE(message)  # it raises
    rest = message[end.end() :]
    if rest.count(b"\n") != rest.count(b"\r\n"):
        rest = _LINE_BREAK.sub(b"\r\n", rest)
    return headers, rest


_ORIGINAL_TAGS: Callable[[bytes], dict[bytes, bytes]] = dkim.util.parse_tag_value


def parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's parse_tag_value (RFC 6376 §3.2), same results and exceptions."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # trailing semicolons are valid
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, sep, value = tag_spec.partition(b"=")
        # re.match(rb"^[a-zA-Z](\w)*", key) only needs an ASCII letter first.
        key = key.strip()
        if not sep or not key[:1].isalpha():
            raise dkim.util.InvalidTagSpec(tag_spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


_DIGESTS: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


def compress_whitespace(content: bytes) -> bytes:
    """RFC 6376 3.4.2/3.4.4: every run of WSP becomes one SP."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _CHANGING_BLANKS.sub(b" ", content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    """RFC 6376 3.4.4: no WSP at the end of a body line."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_BLANKS.sub(b"\r\n", content)


def unfold_header_value(content: bytes) -> bytes:
    """RFC 6376 3.4.2: unfold (drop the CRLF of each continuation)."""
    if b"\n" not in content:
        return content
    # The same as removing every match of \r?\n: a CR counts only right before
    # an LF, and CRLF occurrences never overlap. bytes.replace runs in C.
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


@functools.lru_cache(maxsize=512)
def _public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsa_pkcs1_v1_5_verify(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify(hash, signature, key) on OpenSSL."""
    algorithm = _DIGESTS.get(str(getattr(digest, "name", "")))
    if algorithm is None:
        return _ORIGINAL_VERIFY(digest, signature, public_key)
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
        key.verify(signature, digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    except Exception:  # an odd key or digest: let dkimpy decide, exactly as before
        return _ORIGINAL_VERIFY(digest, signature, public_key)
    return True


_ORIGINAL_EVALUATE_PK: Callable[..., Any] = dkim.evaluate_pk


@functools.lru_cache(maxsize=512)
def _evaluate_pk_cached(name: bytes, record: bytes) -> Any:
    return _ORIGINAL_EVALUATE_PK(name, record)


def evaluate_pk(name: Any, record: Any) -> Any:
    """dkimpy's key-record parser, memoised on (name, record bytes)."""
    if isinstance(record, bytes) and isinstance(name, (bytes, str)):
        key = name.encode() if isinstance(name, str) else name
        return _evaluate_pk_cached(key, record)
    return _ORIGINAL_EVALUATE_PK(name, record)


@functools.cache
def install() -> None:
    """Point dkimpy at the faster versions (once per process)."""
    if getattr(dkim, "RSASSA_PKCS1_v1_5_verify", None) is _ORIGINAL_VERIFY:
        dkim.RSASSA_PKCS1_v1_5_verify = rsa_pkcs1_v1_5_verify
    if dkim.evaluate_pk is _ORIGINAL_EVALUATE_PK:
        dkim.evaluate_pk = evaluate_pk
    if dkim.util.parse_tag_value is _ORIGINAL_TAGS:
        dkim.util.parse_tag_value = parse_tag_value
    if getattr(dkim, "parse_tag_value", None) is _ORIGINAL_TAGS:
        dkim.parse_tag_value = parse_tag_value
    if dkim.rfc822_parse is _ORIGINAL_PARSE:
        dkim.rfc822_parse = rfc822_parse
    if dkim.RE_BTAG is _ORIGINAL_BTAG:
        dkim.RE_BTAG = RE_BTAG
    canon = dkim.canonicalization
    if canon.compress_whitespace is _ORIGINAL_COMPRESS:
        canon.compress_whitespace = compress_whitespace
    if canon.strip_trailing_whitespace is _ORIGINAL_STRIP:
        canon.strip_trailing_whitespace = strip_trailing_whitespace
    if canon.unfold_header_value is _ORIGINAL_UNFOLD:
        canon.unfold_header_value = unfold_header_value
