"""A minimal milter that accepts everything, for benchmarks: ``python accept_milter.py PORT``.

It speaks the protocol as a cheap real filter would (asyncio, one task per connection):
it negotiates version 6, answers "continue" to every step it is sent and "accept" at end
of message. With ``--no-reply`` it asks for SMFIP_NR_* on every step but end of message,
as rspamd does, so a message costs the MTA one round trip instead of one per step.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

NR_ALL = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x40000 | 0x80000 | 0x80
ANSWERED = set(b"CHMRTLNBU")


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    no_reply: bool,
    eom: bytes = b"a",
) -> None:
    try:
        while True:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            data = await reader.readexactly(length)
            command = data[:1]
            if command == b"O":
                protocol = NR_ALL if no_reply else 0
                writer.write(struct.pack(">IcIII", 13, b"O", 6, 0, protocol))
            elif command == b"E":
                writer.write(struct.pack(">Ic", 1, eom))
            elif command == b"Q":
                break
            elif command[0] in ANSWERED and not no_reply:
                writer.write(struct.pack(">Ic", 1, b"c"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--no-reply", action="store_true")
    # "continue" answers end of message SMFIR_CONTINUE (a libmilter filter whose eom
    # callback returns SMFIS_CONTINUE): the MTA may then reuse the connection with
    # SMFIC_QUIT_NC (SMFIC_QUIT_NC is ignored here; the next SMFIC_CONNECT just follows).
    parser.add_argument("--eom", choices=("accept", "continue"), default="accept")
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, args.no_reply, b"a" if args.eom == "accept" else b"c"),
        "127.0.0.1",
        args.port,
    )
    print(f"accept milter on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
