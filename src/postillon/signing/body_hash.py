"""The DKIM body hash (``bh=``) of a body that arrives in pieces, for signing.

Relaxed body canonicalisation (RFC 6376 §3.4.4) done on the fly by
:class:`postillon.dkimcore.body_stream.RelaxedBody` (the verifier streams large bodies
through the same code), so a 50 MB body never has to be in memory at once. SHA-256, the
only hash RFC 8301 §3.1 still allows.
"""

from __future__ import annotations

import hashlib

from postillon.dkimcore.body_stream import LONG_LINE, RelaxedBody

__all__ = ["LONG_LINE", "RelaxedBodyHash"]


class RelaxedBodyHash:
    """Feed the body (after the empty line that ends the header section) with :meth:`update`,
    then read :meth:`digest` once."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._canon = RelaxedBody()
        self._done = False

    def update(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("body hash already finished")
        out = self._canon.feed(data)
        if out:
            self._hash.update(out)

    def digest(self) -> bytes:
        if not self._done:
            self._done = True
            self._hash.update(self._canon.finish())
        return self._hash.digest()
