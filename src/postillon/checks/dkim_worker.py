"""The DKIM verifier process: ``python -m postillon.checks.dkim_worker``.

Why a process: postillon serves every session from one event loop, and the GIL makes
that loop the limit. Verifying a message's DKIM signatures is pure CPU (about 0.3 ms
with two signatures, more than half of what accepting the message costs otherwise), so
it runs here, on another core, while the loop goes on with other sessions. The server
looks the keys up (through its resolver and cache) and sends them along, so this process
does no I/O but reading requests and writing answers.

Wire format, both directions: a 4-byte big-endian length, then a ``marshal``-encoded
tuple (``marshal`` is the fastest codec for bytes, str, tuples and dicts; both ends are
the same program, and the data never crosses a trust boundary: the parent wrote it).

* request: ``(request_id, message, keys)``; ``keys`` maps each key name to the record
  (bytes), None (no such key), or a str (the lookup failed temporarily: the reason);
* answer: ``(request_id, results)``; ``results`` is a list of
  ``(result, reason, domain, selector, algorithm, b_prefix)``, one per signature (empty:
  unsigned), or None when the message needs a key the parent did not send (the parent
  then verifies it itself).
"""

from __future__ import annotations

import marshal
import signal
import struct
import sys
from typing import IO, Any

from postillon.dkimcore.canonical import HeaderFormatError, header_fields, split_message
from postillon.dkimcore.verify import KeyUnavailable, parse_signatures, verify_signatures

LENGTH = struct.Struct(">I")
# A request larger than this is refused by the parent before it is sent.
MAX_FRAME = 64 * 1024 * 1024

KeyAnswer = bytes | str | None
ResultRow = tuple[str, str, str, str, str, str]


def encode(payload: Any) -> bytes:
    data = marshal.dumps(payload)
    return LENGTH.pack(len(data)) + data


def verify(message: bytes, keys: dict[str, KeyAnswer]) -> list[ResultRow] | None:
    """The rows for one message; None when a signature's key was not sent."""
    header, body = split_message(message)
    try:
        fields = header_fields(header)
    except HeaderFormatError as exc:
        return [("permerror", f"unparseable header: {exc}"[:120], "", "", "", "")]
    signatures = parse_signatures(fields)
    if any(s.key_name and s.key_name not in keys for s in signatures):
        return None

    def lookup(name: str) -> bytes | None:
        answer = keys[name]
        if isinstance(answer, str):
            raise KeyUnavailable(answer)
        return answer

    return [
        (
            r.result,
            r.reason,
            r.signature.domain,
            r.signature.selector,
            r.signature.tag(b"a"),
            "".join(r.signature.tag(b"b").split())[:8],
        )
        for r in verify_signatures(fields, body, signatures, lookup)
    ]


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer requests until the parent closes the pipe."""
    while True:
        head = _read_exactly(requests, LENGTH.size)
        if head is None:
            return
        body = _read_exactly(requests, LENGTH.unpack(head)[0])
        if body is None:
            return
        request_id, message, keys = marshal.loads(body)
        try:
            rows = verify(message, keys)
        except Exception as exc:  # a verifier bug answers permerror, never kills the worker
            rows = [("permerror", f"verifier error: {exc!r}"[:120], "", "", "", "")]
        answers.write(encode((request_id, rows)))
        answers.flush()


def main() -> None:
    """``python -m postillon.checks.dkim_worker [--user NAME]``: started as root (by a
    server that has not dropped privileges yet), it drops to ``NAME`` after its imports,
    as the server does."""
    # Ctrl-C in a terminal, and a service manager's SIGTERM, reach the whole process
    # group: the server decides when this process ends (it closes the pipe; if the server
    # dies, the pipe closes too), so a shutdown stays orderly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:]
    if args[:1] == ["--user"] and len(args) == 2:
        from postillon.inbound.privileges import drop_privileges

        drop_privileges(args[1])
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
