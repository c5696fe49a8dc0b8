"""``postillon queue ...``: look at and act on the queue, also while the server runs.

The commands open the same queue as the server (the SQLite file, whose WAL lets
them read beside it, or the shared PostgreSQL database, where they see every
node's messages and which node holds each lease), so no server connection is
needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from postillon.app import open_queue_store, queue_path
from postillon.cli import queue_transfer
from postillon.config.model import Config
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import DeliveryState, MessageInfo, QueueStore, StoreError


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _message_json(info: MessageInfo) -> dict[str, Any]:
    return {
        "queue_id": info.queue_id,
        "sender": info.sender,
        "size": info.size,
        "received_at": _iso(info.received_at),
        "client": info.client,
        "source": info.source,
        "recipients": [
            {
                "recipient": r.recipient,
                "original_recipient": r.original_recipient,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_try": _iso(r.next_try) if r.state.value in ("deferred", "pending") else None,
                "last_reply": str(r.last_reply) if r.last_reply else None,
                "lease_owner": r.lease_owner,
            }
            for r in info.records
        ],
    }


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "queue",
        help="list, show and act on queued mail",
        description="Inspect and manage the mail queue (works while the server runs).",
    )
    qsub = q.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    ls = qsub.add_parser("list", help="list queued messages")
    ls.add_argument(
        "--state",
        choices=[s.value for s in DeliveryState],
        help="only messages with a recipient in this state",
    )
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = qsub.add_parser("show", help="show one message: envelope and per-recipient state")
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true")
    for name, text in (
        ("delete", "remove a message from the queue (no bounce)"),
        ("hold", "stop delivery attempts for a message until released"),
        ("release", "release a held message; it is tried again now"),
    ):
        p = qsub.add_parser(name, help=text)
        p.add_argument("queue_id")
    qsub.add_parser("flush", help="try every deferred message now")
    queue_transfer.add_parsers(qsub)


def run(args: argparse.Namespace, config: Config) -> int:
    return asyncio.run(_run(args, config))


async def _run(args: argparse.Namespace, config: Config) -> int:
    path = queue_path(config)
    if config.queue.store == "sqlite" and not path.exists():
        print(
            f"postillon: no queue at {path} (data_dir = {config.data_dir}); "
            "has the server run with this config?",
            file=sys.stderr,
        )
        return 1
    store = open_queue_store(config)
    try:
        if args.queue_command in queue_transfer.COMMANDS:
            return await queue_transfer.run(args, store)
        return await _dispatch(args, store)
    except (StoreError, SchemaError) as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _dispatch(args: argparse.Namespace, store: QueueStore) -> int:
    # Piped output (scripts, grep) gets wide lines instead of folded cells.
    console = Console(width=None if sys.stdout.isatty() else 200)
    now = time.time()
    cmd = args.queue_command
    if cmd == "list":
        state = DeliveryState(args.state) if args.state else None
        messages = await store.list_messages(state=state)
        if args.json:
            print(json.dumps([_message_json(m) for m in messages], indent=2))
            return 0
        if not messages:
            console.print("Queue is empty.")
            return 0
        table = Table(title=f"{len(messages)} message(s) in the queue")
        table.add_column("Queue ID", no_wrap=True, min_width=17)
        for col in ("Received", "Size", "Sender", "Recipient", "State", "Last reply"):
            table.add_column(col, overflow="fold")
        table.add_column("Lease holder", overflow="fold")  # the node delivering it now
        for m in messages:
            for i, r in enumerate(m.records):
                table.add_row(
                    m.queue_id if i == 0 else "",
                    _iso(m.received_at) if i == 0 else "",
                    str(m.size) if i == 0 else "",
                    (m.sender or "<>") if i == 0 else "",
                    r.recipient,
                    r.state.value,
                    str(r.last_reply) if r.last_reply else "",
                    r.lease_owner or "",
                )
        console.print(table)
        return 0
    if cmd == "show":
        info = await store.get_message(args.queue_id)
        if info is None:
            print(f"postillon: no message {args.queue_id} in the queue", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(_message_json(info), indent=2))
            return 0
        console.print(f"[bold]{info.queue_id}[/bold]  from <{info.sender}>  {info.size} bytes")
        console.print(f"received {_iso(info.received_at)} UTC from {info.client} via {info.source}")
        table = Table()
        for col in (
            "Recipient",
            "State",
            "Attempts",
            "Next try (UTC)",
            "Last reply",
            "Lease holder",
        ):
            table.add_column(col, overflow="fold")
        for r in info.records:
            table.add_row(
                r.recipient + (f"\n(was {r.original_recipient})" if r.original_recipient else ""),
                r.state.value,
                str(r.attempts),
                _iso(r.next_try)
                if r.state in (DeliveryState.DEFERRED, DeliveryState.PENDING)
                else "",
                str(r.last_reply) if r.last_reply else "",
                r.lease_owner or "",
            )
        console.print(table)
        return 0
    if cmd == "flush":
        n = await store.flush(now)
        print(f"{n} deferred recipient(s) scheduled for immediate delivery")
        return 0
    if cmd == "delete":
        ok = await store.delete(args.queue_id)
        print(
            f"{args.queue_id}: deleted" if ok else f"postillon: no message {args.queue_id}",
            file=sys.stdout if ok else sys.stderr,
        )
        return 0 if ok else 1
    if cmd in ("hold", "release"):
        op = store.hold if cmd == "hold" else store.release
        n = await op(args.queue_id, now)
        if n == 0:
            print(
                f"postillon: {args.queue_id}: nothing to {cmd} (unknown id or no such recipients)",
                file=sys.stderr,
            )
            return 1
        print(f"{args.queue_id}: {n} recipient(s) {'held' if cmd == 'hold' else 'released'}")
        return 0
    raise AssertionError(cmd)
