"""The dkimpy speed-ups give exactly dkimpy's own results."""

from __future__ import annotations

import hashlib

import dkim
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from hypothesis import given
from hypothesis import strategies as st

from dkim_tools import rsa_key_and_record
from postillon.checks import dkim_speedups as fast

BLANKY = st.binary(max_size=200).map(
    lambda b: bytes(b" \t\r\nab"[x % 6] for x in b)  # mostly blanks and line breaks
)


@given(BLANKY)
def test_canonicalisation_helpers_match_dkimpy(data: bytes) -> None:
    assert fast.compress_whitespace(data) == fast._ORIGINAL_COMPRESS(data)
    assert fast.strip_trailing_whitespace(data) == fast._ORIGINAL_STRIP(data)
    assert fast.unfold_header_value(data) == fast._ORIGINAL_UNFOLD(data)


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_rsa_verify_matches_dkimpy(algorithm: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    public = {"modulus": numbers.n, "publicExponent": numbers.e}
    chosen = hashes.SHA256() if algorithm == "sha256" else hashes.SHA1()
    digest = dkim.HashThrough(hashlib.new(algorithm, b"message"))
    signature = key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(chosen))
    for sig in (signature, signature[:-1] + bytes([signature[-1] ^ 1]), b"\x00" * 256, b""):
        assert fast.rsa_pkcs1_v1_5_verify(digest, sig, public) == bool(
            fast._ORIGINAL_VERIFY(digest, sig, public)
        ), sig[:4]


def test_installed_and_signed_mail_still_verifies() -> None:
    fast.install()
    assert dkim.RSASSA_PKCS1_v1_5_verify is fast.rsa_pkcs1_v1_5_verify
    pem, record = rsa_key_and_record()
    message = b"From: a@x.example\r\nSubject:  two  blanks\t tab\r\n\r\nbody  text \r\n\r\n"
    signed = (
        dkim.sign(message, b"s", b"x.example", pem, canonicalize=(b"relaxed", b"relaxed")) + message
    )
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    assert not dkim.verify(signed.replace(b"body", b"bodY"), dnsfunc=lambda n, timeout=5: record)


SIGNATURE_BYTES = st.binary(max_size=60).map(
    lambda b: bytes(b" \t\r\n\x0bb=;aZ+/0x"[x % 14] for x in b)
)


@given(SIGNATURE_BYTES)
def test_btag_removal_matches_dkimpy(data: bytes) -> None:
    assert fast.RE_BTAG.sub(b"\\1", data) == fast._ORIGINAL_BTAG.sub(b"\\1", data)


_MESSAGE_ALPHABET = b"\r\n\n \tA:b-From x\r\n"
MESSAGE_BYTES = st.binary(max_size=80).map(
    lambda b: bytes(_MESSAGE_ALPHABET[x % len(_MESSAGE_ALPHABET)] for x in b)
)


def _parse_or_error(parse: object, message: bytes) -> object:
    try:
        return parse(message)  # type: ignore[operator]
    except Exception as exc:
        return type(exc).__name__


@given(MESSAGE_BYTES)
def test_rfc822_parse_matches_dkimpy(data: bytes) -> None:
    assert _parse_or_error(fast.rfc822_parse, data) == _parse_or_error(fast._ORIGINAL_PARSE, data)


_TAG_ALPHABET = b" ;=aZ0_\t\xe9"
TAG_LISTS = st.binary(max_size=40).map(
    lambda b: bytes(_TAG_ALPHABET[x % len(_TAG_ALPHABET)] for x in b)
)


@given(TAG_LISTS)
def test_parse_tag_value_matches_dkimpy(data: bytes) -> None:
    def outcome(parse: object) -> object:
        try:
            return parse(data)  # type: ignore[operator]
        except Exception as exc:
            return type(exc).__name__, exc.args

    assert outcome(fast.parse_tag_value) == outcome(fast._ORIGINAL_TAGS)
