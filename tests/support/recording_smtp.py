"""A small receiving SMTP server that records every command it hears.

For tests that must prove what a client did *not* say (no AUTH to an
unverified server, no MAIL over a connection that failed its TLS policy).
It runs its own event loop in a thread, so a test can point a ``postillon
serve`` subprocess at it and then read ``commands`` and ``messages``.

    postillon (subprocess) ──SMTP, STARTTLS with the given context──▶ RecordingSmtp
                                                                       .commands, .messages

It offers STARTTLS when given a context, ``AUTH PLAIN LOGIN`` after TLS
(accepting any password), and takes every message.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field

__all__ = ["RecordingSmtp"]


@dataclass
class RecordingSmtp:
    tls: ssl.SSLContext | None = None  # offer STARTTLS with it (None: no STARTTLS)
    host: str = "127.0.0.1"
    name: str = "rec.test"
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    port: int = 0  # 0: any free port (read it after start)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _stopping: asyncio.Event = field(init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> RecordingSmtp:
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            await self._stopping.wait()
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        def run() -> None:
            self._stopping = asyncio.Event()
            try:
                loop.run_until_complete(serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("RecordingSmtp did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def saw(self, verb: str) -> bool:
        return any(c.upper().startswith(verb) for c in list(self.commands))

    def wait_for_message(self, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.messages, f"no message; commands: {self.commands}"
        return self.messages[0]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        tls = False

        async def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        try:
            await say(f"220 {self.name} ESMTP recorder")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    ext = ["PIPELINING", "8BITMIME"]
                    if self.tls is not None and not tls:
                        ext.append("STARTTLS")
                    if tls:
                        ext.append("AUTH PLAIN LOGIN")
                    await say(
                        "\r\n".join(
                            [f"250-{self.name}"]
                            + [f"250-{e}" for e in ext[:-1]]
                            + [f"250 {ext[-1]}"]
                        )
                    )
                elif verb == "STARTTLS" and self.tls is not None and not tls:
                    await say("220 2.0.0 go ahead")
                    await writer.start_tls(self.tls)
                    tls = True
                elif verb == "AUTH":
                    if len(line.split()) == 2:  # no initial response: ask for it
                        await say("334 ")
                        self.commands.append((await reader.readline()).decode().strip())
                        if line.split()[1].upper() == "LOGIN":
                            await say("334 UGFzc3dvcmQ6")
                            self.commands.append((await reader.readline()).decode().strip())
                    await say("235 2.7.0 ok")
                elif verb == "DATA":
                    await say("354 go")
                    data = bytearray()
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        data += chunk
                    self.messages.append(bytes(data))
                    await say("250 2.0.0 queued")
                elif verb == "QUIT":
                    await say("221 2.0.0 bye")
                    return
                else:
                    await say("250 2.0.0 ok")
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()
