"""The streamed body canonicalisations and hashes (``dkimcore/body_stream.py``) give the
bytes of the whole-body functions (``dkimcore/canonical.py``, themselves compared with
dkimpy in test_dkimcore.py), however the body is cut into chunks; l= counts canonical
octets."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.dkimcore import body_stream
from postillon.dkimcore.body_stream import BodyHashes, canonicalizer, trailing_crlfs
from postillon.dkimcore.canonical import relaxed_body, simple_body

_PIECES = st.sampled_from([b"a", b"xyz", b" ", b"\t", b"  \t ", b"\r\n", b"\r", b"\n", b"."])
BODIES = st.lists(_PIECES, max_size=60).map(b"".join)
CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=8)
WHOLE = {"simple": simple_body, "relaxed": relaxed_body}


def _pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    out, start = [], 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        out.append(body[start:cut])
        start = max(start, cut)
    out.append(body[start:])
    return out


def _streamed(name: str, body: bytes, cuts: list[int]) -> bytes:
    canon = canonicalizer(name)
    return b"".join(canon.feed(p) for p in _pieces(body, cuts)) + canon.finish()


@settings(max_examples=400, deadline=None)
@given(body=BODIES, cuts=CUTS, name=st.sampled_from(["simple", "relaxed"]))
def test_same_bytes_as_the_whole_body_function(body: bytes, cuts: list[int], name: str) -> None:
    assert _streamed(name, body, cuts) == WHOLE[name](body)


@settings(max_examples=100, deadline=None)
@given(body=BODIES, cuts=CUTS)
def test_relaxed_long_lines_in_pieces(body: bytes, cuts: list[int]) -> None:
    saved = body_stream.LONG_LINE
    body_stream.LONG_LINE = 3  # every line is "long": the piecewise path runs everywhere
    try:
        assert _streamed("relaxed", body, cuts) == relaxed_body(body)
    finally:
        body_stream.LONG_LINE = saved


@settings(max_examples=200, deadline=None)
@given(body=BODIES, cuts=CUTS, length=st.integers(min_value=-1, max_value=80))
def test_digests_with_and_without_l(body: bytes, cuts: list[int], length: int) -> None:
    keys = [("simple", "sha256", length), ("relaxed", "sha256", length), ("relaxed", "sha1", -1)]
    hashes = BodyHashes(keys)
    for piece in _pieces(body, cuts):
        hashes.update(piece)
    got = hashes.digests()
    for name, hash_name, l_value in keys:
        canonical = WHOLE[name](body)
        expected = canonical if l_value < 0 else canonical[:l_value]
        assert got[(name, hash_name, l_value)] == hashlib.new(hash_name, expected).digest()


def test_trailing_crlfs_looks_past_its_window() -> None:
    assert trailing_crlfs(b"x" + b"\r\n" * 1000) == 1000
    assert trailing_crlfs(b"\r\n" * 1000) == 1000
    assert trailing_crlfs(b"x\n\r\n") == 1
    assert trailing_crlfs(b"x\r") == 0
