"""``postillon queue export`` / ``import``: move a queue between stores (SQLite → PostgreSQL).

Design note
-----------
Going from one node to several means moving the embedded SQLite queue into the shared
PostgreSQL one without losing or duplicating a message:

1. stop the single node (nothing may change the old queue meanwhile);
2. ``postillon -c old.toml queue export queue.jsonl``;
3. ``postillon -c cluster.toml db migrate`` then ``postillon -c cluster.toml queue import
   queue.jsonl``;
4. start the nodes on the cluster config; keep the old file until they deliver.

The file is JSON Lines: a header line, then one message per line with its envelope,
its *unfinished* recipients (delivered and failed ones are left out, so nothing is
delivered twice) and its body in base64. Import goes through the store protocol's
``commit`` (the same durable, group-committed path as received mail) under the original
queue id and arrival time, so retries and the queue lifetime keep counting from the
original arrival. A queue id that is already in the target queue is skipped: running
the import twice, or again after an interruption, never duplicates a message.

What does not carry over: the attempt count and last reply of deferred recipients (they
are simply due at once in the new queue), and leases (a leased record is exported as
waiting). A message with a held recipient is held again after import.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from collections.abc import Iterator
from typing import IO, Any, Final

from postillon.queue.codec import (
    decode_mail_params,
    decode_rcpt_params,
    encode_mail_params,
    encode_rcpt_params,
)
from postillon.queue.store import (
    DeliveryState,
    MessageInfo,
    NewMessage,
    NewRecipient,
    QueueStore,
)

__all__ = ["COMMANDS", "FORMAT", "add_parsers", "run"]

FORMAT: Final = "postillon-queue-export"
VERSION: Final = 1
COMMANDS: Final = frozenset({"export", "import"})
_IMPORT_CONCURRENCY: Final = 64  # commits in flight: they share group commits
_EVERYTHING: Final = 2**31 - 1


def add_parsers(qsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = qsub.add_parser(
        "export",
        help="write every queued message (unfinished recipients, body) to a file",
        description="Export the queue to a JSON Lines file, e.g. to move an embedded "
        "queue into PostgreSQL: stop the server, export, then `queue import` with the "
        "cluster's config. Read-only: the queue is not changed.",
    )
    export.add_argument("file", help="output file, or - for standard output")
    imp = qsub.add_parser(
        "import",
        help="add the messages of an export file to this config's queue",
        description="Import a `queue export` file into the configured queue (for example "
        "the shared PostgreSQL queue). Messages whose queue id is already there are "
        "skipped, so an import can be re-run safely.",
    )
    imp.add_argument("file", help="input file, or - for standard input")


async def run(args: argparse.Namespace, store: QueueStore) -> int:
    if args.queue_command == "export":
        return await _export(args.file, store)
    return await _import(args.file, store)


# ---------------------------------------------------------------- export


def _message_line(info: MessageInfo, body: bytes) -> dict[str, Any] | None:
    waiting = [r for r in info.records if not r.state.is_final]
    if not waiting:
        return None
    return {
        "queue_id": info.queue_id,
        "sender": info.sender,
        "mail_params": json.loads(encode_mail_params(info.mail_params)),
        "size": info.size,
        "received_at": info.received_at,
        "client": info.client,
        "source": info.source,
        "recipients": [
            {
                "address": r.recipient,
                "original": r.original_recipient,
                "params": json.loads(encode_rcpt_params(r.rcpt_params)),
                "held": r.state is DeliveryState.HELD,
            }
            for r in waiting
        ],
        "body": base64.b64encode(body).decode("ascii"),
    }


async def _read_body(store: QueueStore, queue_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read_body(queue_id)])


async def _export(path: str, store: QueueStore) -> int:
    messages = await store.list_messages(limit=_EVERYTHING)
    out: IO[str] = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")  # noqa: SIM115
    exported = recipients = 0
    try:
        out.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
        for info in messages:
            try:
                body = await _read_body(store, info.queue_id)
            except KeyError:  # delivered and removed since the listing
                continue
            line = _message_line(info, body)
            if line is None:
                continue
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            exported += 1
            recipients += len(line["recipients"])
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {exported} message(s), {recipients} recipient(s)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- import


class ImportFileError(ValueError):
    pass


def _read_lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    source: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for number, text in enumerate(source, 1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ImportFileError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(data, dict):
                raise ImportFileError(f"{path}:{number}: expected a JSON object")
            yield number, data
    finally:
        if source is not sys.stdin:
            source.close()


def _new_message(data: dict[str, Any]) -> tuple[NewMessage, bool]:
    """The message to commit and whether to hold it; KeyError/ValueError if malformed."""
    body = base64.b64decode(data["body"], validate=True)
    recipients = [
        NewRecipient(
            address=r["address"],
            params=decode_rcpt_params(json.dumps(r.get("params", {}))),
            original=r.get("original"),
        )
        for r in data["recipients"]
    ]
    if not recipients:
        raise ValueError("no recipients")
    message = NewMessage(
        queue_id=str(data["queue_id"]),
        sender=str(data["sender"]),
        mail_params=decode_mail_params(json.dumps(data.get("mail_params", {}))),
        recipients=recipients,
        body=io.BytesIO(body),
        size=len(body),
        received_at=float(data["received_at"]),
        client=str(data.get("client", "")),
        source=str(data.get("source", "")),
    )
    held = any(r.get("held") for r in data["recipients"])
    return message, held


async def _import(path: str, store: QueueStore) -> int:
    imported = skipped = 0
    limit = asyncio.Semaphore(_IMPORT_CONCURRENCY)

    async def one(message: NewMessage, held: bool) -> bool:
        async with limit:
            if await store.get_message(message.queue_id) is not None:
                return False
            await store.commit(message)
            if held:
                await store.hold(message.queue_id, time.time())
            return True

    try:
        lines = _read_lines(path)
        first = next(lines, None)
        if first is None or first[1].get("format") != FORMAT:
            print(f"postillon: {path}: not a `postillon queue export` file", file=sys.stderr)
            return 1
        if first[1].get("version") != VERSION:
            print(
                f"postillon: {path}: export version {first[1].get('version')} "
                f"is not supported (this postillon reads {VERSION})",
                file=sys.stderr,
            )
            return 1
        pending: list[asyncio.Task[bool]] = []
        for number, data in lines:
            try:
                message, held = _new_message(data)
            except (KeyError, TypeError, ValueError) as e:
                raise ImportFileError(f"{path}:{number}: malformed message ({e!r})") from None
            pending.append(asyncio.create_task(one(message, held)))
            if len(pending) >= 4 * _IMPORT_CONCURRENCY:
                results = await asyncio.gather(*pending)
                imported += sum(results)
                skipped += len(results) - sum(results)
                pending = []
        results = await asyncio.gather(*pending)
        imported += sum(results)
        skipped += len(results) - sum(results)
    except (OSError, ImportFileError) as e:
        print(f"postillon: {e}", file=sys.stderr)
        print(f"imported {imported} message(s) before the error", file=sys.stderr)
        return 1
    print(f"imported {imported} message(s); {skipped} already in the queue (skipped)")
    return 0
