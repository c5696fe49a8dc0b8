"""Who intake signs, with which keys and header list; the stored bytes verify (dkimpy)."""

from __future__ import annotations

import io
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.config.model import Config, DkimConfig
from postillon.core.envelope import MailParams
from postillon.intake.dkim_sign import PrefixedBody
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import NewRecipient
from postillon.signing.keys import KeyStore, load_key_store, write_new_key
from postillon.signing.signer import DkimSigner, SigningPolicy, SigningSetupError, build_signer


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    write_new_key(tmp_path / "dkim", "example.org", "r", "rsa")
    write_new_key(tmp_path / "dkim", "example.org", "e", "ed25519")
    write_new_key(tmp_path / "dkim", "example.net", "n", "ed25519")
    return load_key_store(tmp_path / "dkim")


def _signer(keys: KeyStore, trusted: tuple[str, ...] = ()) -> DkimSigner:
    config = DkimConfig()
    return DkimSigner(keys, SigningPolicy.create(config.headers, config.oversign, trusted))


def _dnsfunc(keys: KeyStore):  # type: ignore[no-untyped-def]
    records = {f"{k.dns_name}.".encode(): k.txt_value().encode() for k in keys}
    return lambda name, timeout=5: records.get(name)


def _verify_all(message: bytes, keys: KeyStore) -> list[bool]:
    verifier = dkim.DKIM(message)
    count = sum(1 for n, _ in verifier.headers if n.lower() == b"dkim-signature")
    out = []
    for i in range(count):
        try:
            out.append(bool(verifier.verify(idx=i, dnsfunc=_dnsfunc(keys))))
        except dkim.DKIMException:
            out.append(False)
    return out


HEADER = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: hi\r\n"
    b"Date: Sat, 28 Nov 2026 18:00:00 +0000\r\n"
)


def test_who_is_signed(keys: KeyStore) -> None:
    signer = _signer(keys, trusted=("10.0.0.0/8",))
    assert signer.eligible("", authenticated=False)  # local: sendmail, bounces
    assert signer.eligible("192.0.2.1", authenticated=True)  # submission with AUTH
    assert signer.eligible("10.1.2.3", authenticated=False)  # trusted network
    assert not signer.eligible("192.0.2.1", authenticated=False)  # relayed to us
    assert _signer(keys).start(HEADER, "", client_ip="10.1.2.3", authenticated=False) is None


def test_keys_by_author_domain_then_sender(keys: KeyStore) -> None:
    signer = _signer(keys)

    def selectors(header: bytes, sender: str) -> list[str] | None:
        signing = signer.start(header, sender, client_ip="", authenticated=False)
        return None if signing is None else sorted(k.selector for k in signing.keys)

    assert selectors(HEADER, "x@example.net") == ["e", "r"]  # From: wins, both keys
    assert selectors(b"From: news@lists.example.org\r\n", "") == ["e", "r"]  # parent domain
    assert selectors(b"From: x@elsewhere.test\r\n", "bounce@example.net") == ["n"]
    assert selectors(b"From: x@elsewhere.test\r\n", "y@elsewhere.test") is None
    assert selectors(b"Subject: no from\r\n", "") is None
    assert selectors(b"this is not a header\r\n", "a@example.org") is None  # never raises


def test_header_list_oversigns(keys: KeyStore) -> None:
    signing = _signer(keys).start(
        HEADER + b"Received: x\r\nX-Mailer: y\r\n", "", client_ip="", authenticated=False
    )
    assert signing is not None
    fields = signing.finish(1_800_000_000.0).replace(b"\r\n\t", b" ").replace(b": ", b":")
    h = fields.split(b"h=")[1].split(b";")[0].split(b":")
    assert h.count(b"from") == 2 and h.count(b"subject") == 2 and h.count(b"to") == 2
    assert h.count(b"date") == 2 and h.count(b"cc") == 1  # absent, oversigned: none may be added
    assert b"received" not in h and b"x-mailer" not in h
    assert b"t=1800000000" in fields


async def test_intake_stores_signed_bytes(tmp_path: Path, keys: KeyStore) -> None:
    store = MemoryStore()
    intake = Intake(store, "mx.test", tmp_path / "spool", signer=_signer(keys))
    client = ClientInfo(ip="192.0.2.9", helo="laptop", authenticated=True)
    tx = intake.begin("alice@example.org", MailParams(), client, "submission")
    tx.add_recipient(NewRecipient("bob@example.com"))
    tx.start_body()
    message = HEADER + b"\r\n" + b"line  with   spaces \r\n" * 20_000 + b"\r\n\r\n"
    for i in range(0, len(message), 1000):  # arrives in pieces, the header split too
        tx.write(message[i : i + 1000])
    queue_id = await tx.commit()
    stored = b"".join([c async for c in store.read_body(queue_id)])
    assert stored.startswith(b"DKIM-Signature:")
    assert stored.endswith(message)
    (info,) = await store.list_messages()
    assert info.size == len(stored)
    assert _verify_all(stored, keys) == [True, True]


async def test_intake_without_keys_or_for_relayed_mail(tmp_path: Path, keys: KeyStore) -> None:
    store = MemoryStore()
    intake = Intake(store, "mx.test", tmp_path / "spool", signer=_signer(keys))
    relayed = ClientInfo(ip="192.0.2.9", helo="mx.sender.test")
    queue_id = await intake.submit(
        "alice@example.org",
        [NewRecipient("x@example.org")],
        HEADER + b"\r\nbody\r\n",
        client=relayed,
    )
    assert b"DKIM-Signature" not in b"".join([c async for c in store.read_body(queue_id)])
    # A bounce (local, null sender) from the hostname's domain has no key: unsigned.
    bounce = await intake.submit(
        "", [NewRecipient("x@example.org")], b"From: MAILER-DAEMON@mx.test\r\n\r\nx\r\n"
    )
    assert b"DKIM-Signature" not in b"".join([c async for c in store.read_body(bounce)])
    # Ended inside the header section: still signed, with an empty body.
    local = await intake.submit("", [NewRecipient("x@example.org")], HEADER, trace=False)
    stored = b"".join([c async for c in store.read_body(local)])
    assert stored.startswith(b"DKIM-Signature:")


def test_prefixed_body_reads_and_rewinds() -> None:
    body = PrefixedBody(b"AB", io.BytesIO(b"cdef")).as_file()
    assert body.read(1) == b"A" and body.read(3) == b"Bcd" and body.read() == b"ef"
    assert body.seek(0) == 0 and body.read() == b"ABcdef"
    body.seek(0)
    assert [body.read(4), body.read(4), body.read(4)] == [b"ABcd", b"ef", b""]


def test_build_signer_from_config(tmp_path: Path) -> None:
    assert build_signer(Config(data_dir=tmp_path)) is None  # no keys: nothing to do
    write_new_key(tmp_path / "dkim", "example.org", "s", "ed25519")
    assert build_signer(Config(data_dir=tmp_path, dkim=DkimConfig(sign=False))) is None
    signer = build_signer(Config(data_dir=tmp_path))
    assert signer is not None and len(signer.keys) == 1
    (tmp_path / "dkim" / "example.org" / "bad.key").write_text("junk")
    with pytest.raises(SigningSetupError, match=r"\[dkim\]: .*bad.key"):
        build_signer(Config(data_dir=tmp_path))


_NAMES = st.sampled_from([b"From", b"to", b"Subject", b"X-A", b"date"])
_VALUES = st.lists(
    st.sampled_from([b" ", b"\t", b"a", b"B c", b"\r\n ", b"\r\n\t", b"  x  "]), max_size=8
).map(lambda parts: b"".join(parts) + b"\r\n")


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    names=st.lists(st.sampled_from([b"from", b"to", b"subject", b"date", b"cc"]), max_size=10),
)
def test_header_canonicalisation_and_selection_match_dkimpy(
    headers: list[tuple[bytes, bytes]], names: list[bytes]
) -> None:
    from dkim.canonicalization import Relaxed

    from postillon.dkimcore.canonical import relaxed_header, select_headers

    assert select_headers(headers, names) == dkim.select_headers(headers, names)
    expected = [n + b":" + v for n, v in Relaxed.canonicalize_headers(headers)]
    assert [relaxed_header(n, v) for n, v in headers] == expected


async def test_signatures_are_counted(tmp_path: Path, keys: KeyStore) -> None:
    from postillon.observability.metrics import Metrics

    metrics = Metrics()
    intake = Intake(
        MemoryStore(), "mx.test", tmp_path / "spool", signer=_signer(keys), metrics=metrics
    )
    await intake.submit("", [NewRecipient("x@example.org")], HEADER + b"\r\nbody\r\n")

    def count(algorithm: str) -> float | None:
        return metrics.registry.get_sample_value(
            "postillon_dkim_signatures_total", {"algorithm": algorithm}
        )

    assert (count("rsa"), count("ed25519")) == (1.0, 1.0)


def test_idn_author_domain_finds_the_a_label_key(tmp_path: Path) -> None:
    write_new_key(tmp_path / "idn", "bücher.example", "s", "ed25519")
    store = load_key_store(tmp_path / "idn")
    assert store.domains == ("xn--bcher-kva.example",)
    header = "From: Bücher <info@bücher.example>\r\n".encode()
    signing = _signer(store).start(header, "", client_ip="", authenticated=True)
    assert signing is not None
    assert b"d=xn--bcher-kva.example;" in signing.finish(1_800_000_000.0)
