"""A helper process: ``python -m postillon.helpers.process [--user NAME]``.

It reads requests from stdin and writes answers to stdout (``wire.py``), one at a time,
and does no other I/O: the server looks up what the work needs (DKIM keys, through its
resolver and cache) and sends it along. Started as root by a server that has not dropped
privileges yet, it drops to ``NAME`` after its imports, as the server does.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import IO, Any

from postillon.dkimcore.remote import verify_request
from postillon.helpers.wire import NO_ANSWER, encode, read_frame
from postillon.signing.remote_keys import RemoteKeys

Handler = Callable[[Any], Any]


def handlers() -> dict[str, Handler]:
    """What this process can do, by request kind."""
    keys = RemoteKeys()
    return {"verify": verify_request, "sign": keys.sign, "keys": keys.replace}


def serve(requests: IO[bytes], answers: IO[bytes], table: dict[str, Handler]) -> None:
    """Answer requests until the server closes the pipe."""
    while (frame := read_frame(requests)) is not None:
        request_id, kind, payload = frame
        handler = table.get(kind)
        try:
            result = handler(payload) if handler is not None else None
        except Exception as exc:  # a bug answers "do it yourself", never kills the helper
            print(f"postillon helper: {kind} failed: {exc!r}", file=sys.stderr)
            result = None
        if request_id != NO_ANSWER:
            answers.write(encode((request_id, result)))
            answers.flush()


def main() -> None:
    # Ctrl-C in a terminal, and a service manager's SIGTERM, reach the whole process
    # group: the server decides when this process ends (it closes the pipe; if the server
    # dies, the pipe closes too), so a shutdown stays orderly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:]
    table = handlers()
    if args[:1] == ["--user"] and len(args) == 2:
        from postillon.osutil.privilege import drop_privileges

        drop_privileges(args[1])
    serve(sys.stdin.buffer, sys.stdout.buffer, table)


if __name__ == "__main__":
    main()
