"""The dkimpy speed-ups give exactly dkimpy's own results."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import re
from typing import Any

import dkim
import dkim.canonicalization
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


# -- the dkimpy code the speed-ups stand in for ------------------------------------------------
#
# dkim_speedups replaces private functions of dkimpy (used for ARC, checks/arc_check.py), so
# pyproject.toml pins dkimpy to the minor version tested (1.1.*). These fingerprints are of
# dkimpy 1.1.8's own code. When one fails, dkimpy changed what postillon patches: read the
# new code, make dkim_speedups match it (the equivalence tests above must pass), then put
# the new fingerprint here. If dkimpy became fast itself, drop the speed-up instead.
TESTED_DKIMPY = "1.1."
FINGERPRINTS = {
    "dkim.crypto.RSASSA_PKCS1_v1_5_verify": ("_ORIGINAL_VERIFY", "8398ae89bb481414"),
    "dkim.evaluate_pk": ("_ORIGINAL_EVALUATE_PK", "34a4ff7fe602586b"),
    "dkim.util.parse_tag_value": ("_ORIGINAL_TAGS", "864f2d17fbfde19c"),
    "dkim.rfc822_parse": ("_ORIGINAL_PARSE", "7f14c5bce64fa86a"),
    "dkim.RE_BTAG": ("_ORIGINAL_BTAG", "9462d3ccdeee123a"),
    "dkim.canonicalization.compress_whitespace": ("_ORIGINAL_COMPRESS", "7ee4d82e06fc310a"),
    "dkim.canonicalization.strip_trailing_whitespace": ("_ORIGINAL_STRIP", "07ef48de2ef08e4b"),
    "dkim.canonicalization.unfold_header_value": ("_ORIGINAL_UNFOLD", "28ed65c29158c5a4"),
}


def test_dkimpy_is_the_tested_minor_version() -> None:
    version = importlib.metadata.version("dkimpy")
    assert version.startswith(TESTED_DKIMPY), (
        f"dkimpy {version} is installed; dkim_speedups was checked against {TESTED_DKIMPY}x "
        "(see FINGERPRINTS in this file before changing the pin in pyproject.toml)"
    )


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_patched_dkimpy_code_is_unchanged(name: str) -> None:
    attribute, expected = FINGERPRINTS[name]
    original = getattr(fast, attribute)  # captured before install() replaced it
    text = original.pattern if isinstance(original, re.Pattern) else inspect.getsource(original)
    data = text if isinstance(text, bytes) else text.encode()
    assert hashlib.sha256(data).hexdigest()[:16] == expected, (
        f"dkimpy's {name} changed: dkim_speedups replaces it with code checked against the "
        "old one. Re-check the speed-up against the new code, then update FINGERPRINTS."
    )


class _Counting:
    """Wraps a function or a compiled pattern and counts the calls dkimpy makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)

    def sub(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner.sub(*args)


def test_dkimpy_still_calls_what_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A speed-up only counts if dkimpy looks the name up where install() replaced it."""
    fast.install()
    patched = [
        (dkim, "RSASSA_PKCS1_v1_5_verify", fast.rsa_pkcs1_v1_5_verify),
        (dkim, "evaluate_pk", fast.evaluate_pk),
        (dkim, "parse_tag_value", fast.parse_tag_value),
        (dkim, "rfc822_parse", fast.rfc822_parse),
        (dkim, "RE_BTAG", fast.RE_BTAG),
        (dkim.canonicalization, "compress_whitespace", fast.compress_whitespace),
        (dkim.canonicalization, "strip_trailing_whitespace", fast.strip_trailing_whitespace),
        (dkim.canonicalization, "unfold_header_value", fast.unfold_header_value),
    ]
    spies: dict[tuple[Any, str], _Counting] = {}
    for module, name, replacement in patched:
        assert getattr(module, name) is replacement, f"{module.__name__}.{name} not replaced"
        spies[module, name] = _Counting(replacement)
        monkeypatch.setattr(module, name, spies[module, name])
    pem, record = rsa_key_and_record()
    message = b"From: a@x.example\r\nSubject:  two\r\n  lines\r\n\r\nbody\t text \r\n"
    signed = (
        dkim.sign(message, b"s", b"x.example", pem, canonicalize=(b"relaxed", b"relaxed")) + message
    )
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    unused = [f"{m.__name__}.{n}" for (m, n), spy in spies.items() if spy.calls == 0]
    assert unused == [], f"dkimpy no longer calls {unused}: those speed-ups do nothing"
