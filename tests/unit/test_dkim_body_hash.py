"""The streaming relaxed body hash equals dkimpy's whole-body canonicalisation, however the
body is cut into chunks."""

from __future__ import annotations

import hashlib

from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.dkimcore import body_stream
from postillon.signing.body_hash import RelaxedBodyHash


def _reference(body: bytes) -> bytes:
    # A body without its final CRLF gets one first, as the next hop's DATA adds it.
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


def _streamed(body: bytes, cuts: list[int]) -> bytes:
    h = RelaxedBodyHash()
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        h.update(body[start:cut])
        start = max(start, cut)
    h.update(body[start:])
    return h.digest()


_PIECES = st.sampled_from([b"a", b"xyz", b" ", b"\t", b"  \t ", b"\r\n", b"\r", b"."])
BODIES = st.lists(_PIECES, max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=BODIES, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_same_as_dkimpy_for_any_chunking(body: bytes, cuts: list[int]) -> None:
    assert _streamed(body, cuts) == _reference(body)


@settings(max_examples=100, deadline=None)
@given(body=BODIES, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_long_lines_hashed_in_pieces(body: bytes, cuts: list[int]) -> None:
    saved = body_stream.LONG_LINE
    body_stream.LONG_LINE = 3  # every line is "long": the piecewise path runs everywhere
    try:
        assert _streamed(body, cuts) == _reference(body)
    finally:
        body_stream.LONG_LINE = saved


def test_known_values() -> None:
    # RFC 6376 §3.4.6 example, and the empty body (relaxed: the hash of nothing).
    assert _streamed(b" C \r\nD \t E\r\n\r\n\r\n", []) == hashlib.sha256(b" C\r\nD E\r\n").digest()
    assert _streamed(b"", []) == hashlib.sha256(b"").digest()
    assert _streamed(b"\r\n\r\n", []) == hashlib.sha256(b"").digest()
    assert _streamed(b"x", []) == hashlib.sha256(b"x\r\n").digest()
