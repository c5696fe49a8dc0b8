"""postillon.dkimcore against dkimpy (the reference), and the RFC 6376 rules it enforces.

The differential tests sign random messages with dkimpy (every canonicalisation, RSA and
Ed25519, l= or not, random header lists), change them the way mail gets changed on the
way (a body byte, whitespace, an added field, a second From:), and require dkimcore's
verdict to be dkimpy's.
"""

from __future__ import annotations

import base64
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dkim_tools import rsa_key_and_record
from postillon.dkimcore.canonical import (
    header_fields,
    relaxed_body,
    relaxed_header,
    simple_body,
)
from postillon.dkimcore.tags import KeyRecordError, TagListError, parse_key_record, parse_tags
from postillon.dkimcore.verify import KeyUnavailable, verify_message

DOMAIN = "x.example"


def _ed25519() -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def _short_rsa_record() -> bytes:
    """A 512-bit RSA public key (cryptography will not generate one; any odd modulus of
    that size loads)."""
    public = rsa.RSAPublicNumbers(65537, (1 << 511) | 0xF1).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; p=" + base64.b64encode(der)


SHORT_RSA_RECORD = _short_rsa_record()
RSA_PEM, RSA_RECORD = rsa_key_and_record()
ED_SEED, ED_RECORD = _ed25519()
RECORDS = {f"rsa._domainkey.{DOMAIN}": RSA_RECORD, f"ed._domainkey.{DOMAIN}": ED_RECORD}


def lookup(name: str) -> bytes | None:
    return RECORDS.get(name)


def dkimpy_verdicts(message: bytes) -> list[bool]:
    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return RECORDS.get(name.decode().rstrip("."))

    count = sum(
        1 for n, _ in header_fields(message.split(b"\r\n\r\n")[0]) if n.lower() == b"dkim-signature"
    )
    verifier = dkim.DKIM(message)
    out = []
    for i in range(count):
        try:
            out.append(bool(verifier.verify(i, dnsfunc=dns)))
        except dkim.DKIMException:
            out.append(False)
    return out


def sign(message: bytes, algorithm: bytes, canon: tuple[bytes, bytes], **kw: object) -> bytes:
    selector, key = (b"ed", ED_SEED) if algorithm == b"ed25519-sha256" else (b"rsa", RSA_PEM)
    field = dkim.sign(
        message,
        selector,
        DOMAIN.encode(),
        key,
        canonicalize=canon,
        signature_algorithm=algorithm,
        **kw,  # type: ignore[arg-type]
    )
    return field + message


# Text with the whitespace that canonicalisation cares about.
WORDS = st.lists(
    st.sampled_from(["a", "bc", "Def", " ", "  ", "\t", " \t ", "x=y", ";"]), max_size=12
).map("".join)
HEADER_NAMES = st.sampled_from(["Subject", "To", "Cc", "X-Tag", "Date", "Reply-To"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = [b"From: A <a@" + DOMAIN.encode() + b">"]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(HEADER_NAMES)
        value = draw(WORDS)
        if draw(st.booleans()):
            value += "\r\n\t" + draw(WORDS)  # folded
        fields.append(f"{name}:{' ' if draw(st.booleans()) else ''}{value}".encode())
    lines = draw(st.lists(WORDS, max_size=8))
    trailing = draw(st.sampled_from(["", "\r\n", "\r\n\r\n", " \r\n\r\n"]))
    body = "".join(line + "\r\n" for line in lines) + trailing
    return b"\r\n".join(fields) + b"\r\n\r\n" + body.encode()


MUTATIONS = st.sampled_from(
    ["none", "body-byte", "body-space", "body-line", "header-space", "add-field", "add-from"]
)


def mutate(message: bytes, how: str) -> bytes:
    """A change on the way; the body keeps ending with CRLF, as SMTP DATA makes it (what
    to do with a body that does not is left open by RFC 6376 3.4.4, and dkimpy differs)."""
    head, _, body = message.partition(b"\r\n\r\n")
    if how == "body-byte":
        body = b"Z" + body
    elif how == "body-space":
        body = body.replace(b" ", b"  ", 1) if b" " in body else b" \r\n" + body
    elif how == "body-line":
        body += b"\r\n\r\nmore\r\n"
    elif how == "header-space":
        head = head.replace(b"From: A", b"From:  A", 1)
    elif how == "add-field":
        head += b"\r\nSubject: added later"
    elif how == "add-from":
        head += b"\r\nFrom: mallory@evil.example"
    return head + b"\r\n\r\n" + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages(),
    st.sampled_from([b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1"]),
    st.sampled_from(
        [
            (b"relaxed", b"relaxed"),
            (b"simple", b"simple"),
            (b"relaxed", b"simple"),
            (b"simple", b"relaxed"),
        ]
    ),
    st.booleans(),
    st.lists(HEADER_NAMES, max_size=4),
    MUTATIONS,
)
def test_verdicts_match_dkimpy(
    message: bytes,
    algorithm: bytes,
    canon: tuple[bytes, bytes],
    length: bool,
    extra_headers: list[str],
    how: str,
) -> None:
    include = [b"from"] + [h.lower().encode() for h in extra_headers]
    signed = sign(message, algorithm, canon, include_headers=include, length=length)
    changed = mutate(signed, how)
    ours = [r.result == "pass" for r in verify_message(changed, lookup)]
    assert ours == dkimpy_verdicts(changed)
    if how == "none":
        assert ours == [True]


def test_two_signatures_each_get_a_result_and_share_the_body_hash() -> None:
    message = b"From: a@x.example\r\nSubject: two\r\n\r\nbody  text \r\n\r\n"
    signed = sign(message, b"rsa-sha256", (b"relaxed", b"relaxed"))
    signed = sign(signed, b"ed25519-sha256", (b"relaxed", b"relaxed"))
    results = verify_message(signed, lookup)
    assert [(r.result, r.signature.selector) for r in results] == [("pass", "ed"), ("pass", "rsa")]
    assert [r.result for r in verify_message(signed.replace(b"text", b"test"), lookup)] == [
        "fail",
        "fail",
    ]
    assert verify_message(signed.replace(b"text", b"test"), lookup)[0].reason == (
        "body hash did not verify"
    )


SIGNED = sign(
    b"From: a@x.example\r\nSubject: s\r\n\r\nbody\r\n", b"rsa-sha256", (b"relaxed", b"relaxed")
)


def _with_tags(**changes: str) -> bytes:
    """SIGNED with some signature tags replaced (the signature then no longer matters)."""
    head, _, rest = SIGNED.partition(b"\r\n\r\n")
    field_end = head.index(b"\r\nFrom:")
    sig = head[len(b"DKIM-Signature:") : field_end]
    tags = parse_tags(sig)
    for name, value in changes.items():
        if value == "":
            tags.pop(name.encode(), None)
        else:
            tags[name.encode()] = value.encode()
    rebuilt = b"DKIM-Signature: " + b"; ".join(k + b"=" + v for k, v in tags.items())
    return rebuilt + head[field_end:] + b"\r\n\r\n" + rest


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": "2"}, "v= is not 1"),
        ({"a": "rsa-md5"}, "unknown algorithm"),
        ({"bh": ""}, "no bh="),
        ({"h": "subject"}, "h= does not include From"),
        ({"i": "a@other.example"}, "i= is not in d="),
        ({"q": "dns/other"}, "q= is not dns/txt"),
        ({"c": "fancy/relaxed"}, "unknown canonicalization"),
        ({"l": "ten"}, "l= is not a number"),
        ({"x": str(int(time.time()) - 86_400)}, "signature expired"),
        ({"t": str(int(time.time()) + 86_400)}, "t= is in the future"),
        ({"b": "not*base64"}, "b= is not base64"),
    ],
)
def test_malformed_signatures_are_permerrors_naming_the_tag(
    changes: dict[str, str], reason: str
) -> None:
    (result,) = verify_message(_with_tags(**changes), lookup)
    assert result.result == "permerror"
    assert reason in result.reason


def test_key_problems() -> None:
    def answers(record: bytes | Exception | None):  # type: ignore[no-untyped-def]
        def look(name: str) -> bytes | None:
            if isinstance(record, Exception):
                raise record
            return record

        return look

    cases: list[tuple[bytes | Exception | None, str, str]] = [
        (None, "permerror", "no key"),
        (KeyUnavailable("SERVFAIL"), "temperror", "SERVFAIL"),
        (b"v=DKIM1; k=rsa; p=", "permerror", "revoked"),
        (ED_RECORD, "permerror", "needs a rsa key"),
        (RSA_RECORD + b"; h=sha1", "permerror", "does not allow sha256"),
        (RSA_RECORD + b"; s=tlsrpt", "permerror", "not for email"),
        (SHORT_RSA_RECORD, "permerror", "512 bits"),
        (b"v=DKIM1; k=rsa; k=rsa; p=AAAA", "permerror", "twice"),
        (RSA_RECORD + b"; h=sha256:sha1; t=y", "pass", ""),
    ]
    for record, result, reason in cases:
        (got,) = verify_message(SIGNED, answers(record))
        assert (got.result, reason in got.reason) == (result, True), (record, got)


def test_strict_key_flag_refuses_a_subdomain_identity() -> None:
    message = b"From: a@x.example\r\n\r\nbody\r\n"
    signed = sign(message, b"rsa-sha256", (b"relaxed", b"relaxed"), identity=b"a@sub.x.example")
    (got,) = verify_message(signed, lambda _: RSA_RECORD + b"; t=s")
    assert got.result == "permerror" and "t=s" in got.reason
    (got,) = verify_message(signed, lambda _: RSA_RECORD)
    assert got.result == "pass"


def test_unsigned_message_has_no_results() -> None:
    assert verify_message(b"From: a@x.example\r\n\r\nhi\r\n", lookup) == []


def test_tag_lists() -> None:
    assert parse_tags(b" v = 1 ;a=rsa-sha256;\r\n\t b = ab cd ; ") == {
        b"v": b"1",
        b"a": b"rsa-sha256",
        b"b": b"ab cd",
    }
    for bad in (b"v=1; v=1", b"=x", b"v", b"1v=2"):
        with pytest.raises(TagListError):
            parse_tags(bad)
    with pytest.raises(KeyRecordError):
        parse_key_record(b"v=DKIM2; p=AAAA")


BLANKY = st.binary(max_size=200).map(lambda b: bytes(b" \t\r\nab"[x % 6] for x in b))


@given(BLANKY)
def test_body_canonicalisation_matches_dkimpy(data: bytes) -> None:
    # CRLF-only bodies, as SMTP delivers them (dkimpy treats a bare CR or LF differently).
    body = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    policy = dkim.canonicalization
    assert simple_body(body) == policy.Simple.canonicalize_body(body)
    assert relaxed_body(body) == policy.Relaxed.canonicalize_body(body)


@given(st.sampled_from([b"Subject", b"SUBJECT ", b"x-Tag"]), BLANKY)
def test_header_canonicalisation_matches_dkimpy(name: bytes, value: bytes) -> None:
    value = value.replace(b"\r", b"").replace(b"\n", b"\r\n ")  # folding only
    ((dkimpy_name, dkimpy_value),) = dkim.canonicalization.Relaxed.canonicalize_headers(
        [(name, value + b"\r\n")]
    )
    assert relaxed_header(name, value) == dkimpy_name + b":" + dkimpy_value
