"""The frames between the server and its helper processes.

Each frame is a 4-byte big-endian length, then a ``marshal``-encoded tuple. ``marshal``
is the fastest codec for bytes, str, tuples and dicts; both ends are the same program
and the data never crosses a trust boundary (the server wrote it, to its own child).

* request: ``(request_id, kind, payload)``; ``request_id`` 0 is a state update (the
  signing keys) that gets no answer;
* answer: ``(request_id, result)``; a result of None means "I cannot: do it yourself".
"""

from __future__ import annotations

import marshal
import struct
from typing import IO, Any

LENGTH = struct.Struct(">I")
# A request larger than this is not sent: the server does that work itself.
MAX_FRAME = 64 * 1024 * 1024
# The request id of a state update, which is not answered.
NO_ANSWER = 0


def encode(payload: Any) -> bytes:
    data = marshal.dumps(payload)
    return LENGTH.pack(len(data)) + data


def read_frame(stream: IO[bytes]) -> Any | None:
    """The next decoded frame, or None at the end of the stream (a blocking read)."""
    head = _read_exactly(stream, LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(stream, LENGTH.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None
