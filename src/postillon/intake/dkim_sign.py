"""Intake's DKIM hook: start signing when the header section ends, put the fields on top at
commit, so the store holds the signed bytes and every retry sends the same ones.

The body is already in the spool file when the signature is known (it needs the body hash),
so the fields are not written into the file: :class:`PrefixedBody` reads them first and then
the spool, which costs no copy of the body.
"""

from __future__ import annotations

import io
import logging
from functools import partial
from typing import IO, cast

from postillon.signing.signer import DkimSigner, MessageSigning, assemble
from postillon.worker_thread import WorkerThread

log = logging.getLogger("postillon.dkim")

# RSA signatures of every transaction, one thread, one event-loop wake-up per batch.
_RSA_WORKER = WorkerThread("postillon-dkim-rsa")


def start_signing(
    signer: DkimSigner | None,
    header_section: bytes,
    sender: str,
    client_ip: str,
    authenticated: bool,
) -> MessageSigning | None:
    """The signing of one message, or None when it is not signed (never raises: a message
    that cannot be signed is still accepted, unsigned, and the reason logged)."""
    if signer is None:
        return None
    try:
        return signer.start(
            header_section, sender, client_ip=client_ip, authenticated=authenticated
        )
    except Exception:
        log.exception("DKIM signing could not start; the message goes unsigned")
        return None


async def signature_fields(signing: MessageSigning, now: float) -> bytes:
    """The DKIM-Signature fields, or b"" (logged) if signing failed.

    An RSA-2048 signature costs about 0.27 ms of OpenSSL time, several times the rest of
    the signing; ``cryptography`` releases the GIL for it, so that one call runs in a
    worker thread and the event loop serves other sessions meanwhile (the Python part,
    hashing and building the fields, stays here: in the thread it would have to win the
    GIL back from the busy loop). The thread is a :class:`WorkerThread`, not
    ``asyncio.to_thread``: under load its hand-offs are batched, which halved what the
    hop cost (bench/README.md). Ed25519 (0.02 ms) is cheaper than any hop: inline."""
    try:
        fields = signing.prepare(now)
        signatures = []
        for field in fields:
            if field.key.algorithm == "rsa":
                signatures.append(await _RSA_WORKER.run(partial(field.key.sign, field.digest)))
            else:
                signatures.append(field.key.sign(field.digest))
        return assemble(fields, signatures)
    except Exception:
        log.exception("DKIM signing failed; the message goes unsigned")
        return b""


class PrefixedBody(io.RawIOBase):
    """``prefix`` then ``rest`` (from its start), as one readable, rewindable file."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self._prefix = prefix
        self._rest = rest
        self._pos = 0
        rest.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset != 0:
            raise io.UnsupportedOperation("PrefixedBody can only rewind to 0")
        self._pos = 0
        self._rest.seek(0)
        return 0

    def tell(self) -> int:
        return self._pos if self._pos < len(self._prefix) else self._pos + self._rest.tell()

    def read(self, size: int = -1) -> bytes:
        head = b""
        if self._pos < len(self._prefix):
            end = len(self._prefix) if size < 0 else min(len(self._prefix), self._pos + size)
            head = self._prefix[self._pos : end]
            self._pos = end
            if size >= 0:
                size -= len(head)
                if size == 0:
                    return head
        return head + self._rest.read(size)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def as_file(self) -> IO[bytes]:
        """This object typed as the ``IO[bytes]`` the store's ``NewMessage.body`` expects."""
        return cast(IO[bytes], self)
