"""Intake's DKIM hook: start signing when the header section ends, put the fields on top at
commit, so the store holds the signed bytes and every retry sends the same ones.

The body is already in the spool file when the signature is known (it needs the body hash),
so the fields are not written into the file: :class:`PrefixedBody` reads them first and then
the spool, which costs no copy of the body.
"""

from __future__ import annotations

import io
import logging
from typing import IO, cast

from postillon.helpers.pool import HelperPool
from postillon.signing.signer import DkimSigner, MessageSigning, assemble

log = logging.getLogger("postillon.dkim")


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


async def signature_fields(
    signing: MessageSigning, now: float, helpers: HelperPool | None = None
) -> bytes:
    """The DKIM-Signature fields, or b"" (logged) if signing failed.

    An RSA-2048 signature costs about 0.27 ms of CPU, several times the rest of the
    signing, and ``cryptography`` holds the GIL for part of it: with helper processes
    (``postillon.helpers``) that one operation runs in one of them, on another core, and
    the event loop serves other sessions meanwhile; the Python part (building the fields)
    stays here. Without helpers, or when none answers, the server signs itself. Ed25519
    (0.02 ms) costs less than the trip: inline, while an RSA signature is being made."""
    try:
        fields = signing.prepare(now)
        remote = {
            index: helpers.submit("sign", (field.key.fingerprint, field.digest))
            for index, field in enumerate(fields)
            if helpers is not None and field.key.algorithm == "rsa"
        }
        signatures = [
            b"" if index in remote else field.key.sign(field.digest)
            for index, field in enumerate(fields)
        ]
        for index, request in remote.items():
            assert helpers is not None
            answer = await helpers.answer(request, "sign")
            signatures[index] = answer or fields[index].key.sign(fields[index].digest)
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
