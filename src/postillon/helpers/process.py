"""A helper process: ``python -m postillon.helpers.process [--user NAME]``.

It reads requests from stdin and writes answers to stdout (``wire.py``), one at a time,
and does no other I/O: the server looks up what the work needs (DKIM keys, through its
resolver and cache) and sends it along. Started as root by a server that has not dropped
privileges yet, it drops to ``NAME`` after importing the standard library modules its work
needs, as the server does.

Its handlers (cryptography and PyNaCl: two thirds of a helper's memory, about 11 of
18 MiB PSS) are imported from site-packages on the first request that needs them, so a
server that receives no signed mail and signs none with RSA keeps an idle helper of a
few MiB (bench/README.md, "Memory").
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

from postillon.helpers.wire import NO_ANSWER, encode, read_frame

Handler = Callable[[Any], Any]

# The standard library modules that the handlers' imports and work need (cryptography,
# PyNaCl, postillon.dkimcore and postillon.signing import them). Imported before the
# privilege drop: after it, the interpreter's own library may be unreadable (a Python under
# /root, as on the bench machine). tests/unit/test_helper_memory.py checks the list is
# complete: it verifies and signs with every other standard library import refused.
STDLIB_PREREQUISITES = (
    "ast",
    "base64",
    "binascii",
    "bisect",
    "copy",
    "dataclasses",
    "dis",
    "hashlib",
    "importlib.machinery",
    "inspect",
    "linecache",
    "math",
    "opcode",
    "random",
    "token",
    "tokenize",
    "weakref",
)


def handlers() -> dict[str, Handler]:
    """What this process can do, by request kind."""
    from postillon.dkimcore.remote import verify_request
    from postillon.signing.remote_keys import RemoteKeys

    keys = RemoteKeys()
    return {"verify": verify_request, "sign": keys.sign, "keys": keys.replace}


KINDS = ("verify", "sign", "keys")  # handlers()'s keys


class HandlerTable(Protocol):
    def get(self, kind: str) -> Handler | None: ...


class LazyHandlers:
    """:func:`handlers`, made on the first request that needs them. An empty key set (the
    server shares one at start when it has no RSA keys) needs nothing imported."""

    def __init__(self) -> None:
        self._table: dict[str, Handler] | None = None
        self._unimportable = False

    def get(self, kind: str) -> Handler | None:
        if self._table is None:
            if kind == "keys":
                return self._keys
            if kind not in KINDS:
                return None
            self._load()
        return self._table.get(kind) if self._table is not None else None

    def _keys(self, keys: dict[str, bytes]) -> None:
        if keys:  # RSA keys to sign with: the handlers are needed now
            self._load()
            if self._table is not None:
                self._table["keys"](keys)

    def _load(self) -> None:
        if self._unimportable:
            return
        try:
            self._table = handlers()
        except (ImportError, OSError) as exc:
            # site-packages unreadable by the server's user: every request is answered
            # None, i.e. done by the server, which imported the same code as root.
            print(f"postillon helper: cannot import its handlers: {exc!r}", file=sys.stderr)
            self._unimportable = True


def import_prerequisites() -> None:
    for name in STDLIB_PREREQUISITES:
        importlib.import_module(name)


def serve(requests: IO[bytes], answers: IO[bytes], table: HandlerTable) -> None:
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
    import_prerequisites()
    if args[:1] == ["--user"] and len(args) == 2:
        from postillon.osutil.privilege import drop_privileges

        drop_privileges(args[1])
    serve(sys.stdin.buffer, sys.stdout.buffer, LazyHandlers())


if __name__ == "__main__":
    main()
