#!/usr/bin/env python3
"""A counting SMTP sink with STARTTLS, for bench/tls_bench.py (smtp-sink has no TLS).

    tls_sink.py PORT CERT KEY COUNT_FILE

Listens on 127.0.0.1:PORT, offers STARTTLS with CERT/KEY and PIPELINING, answers 250
to everything, and writes the number of messages received so far to COUNT_FILE about
twenty times a second. One asyncio loop in its own process, so its CPU is its own.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from pathlib import Path

count = 0


async def session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext
) -> None:
    global count
    writer.write(b"220 mx.bench.test ESMTP sink\r\n")
    tls = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                offer = b"" if tls else b"250-STARTTLS\r\n"
                writer.write(
                    b"250-mx.bench.test\r\n250-PIPELINING\r\n" + offer + b"250 8BITMIME\r\n"
                )
            elif verb == b"STAR":
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await writer.start_tls(ctx)
                tls = True
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                count += 1
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            if not reader._buffer:  # type: ignore[attr-defined]  # a pipelined group: one write
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return
    finally:
        writer.close()


async def report(path: Path) -> None:
    last = -1
    while True:
        if count != last:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{count}\n")
            os.replace(tmp, path)
            last = count
        await asyncio.sleep(0.05)


async def main() -> None:
    port, cert, key, count_file = sys.argv[1:5]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: session(r, w, ctx), "127.0.0.1", int(port), backlog=512
    )
    async with server:
        await asyncio.gather(server.serve_forever(), report(Path(count_file)))


if __name__ == "__main__":
    asyncio.run(main())
