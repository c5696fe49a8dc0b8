"""``postillon queue ...``: look at and act on the queue, also while the server runs.

The commands open the same queue as the server (the SQLite file, whose WAL lets
them read beside it, or the shared PostgreSQL database, where they see every
node's messages and which node holds each lease), so no server connection is
needed. They
call the same operations as the admin API (``admin/queue_ops.py``) and their
``--json`` output has the API's shapes, so scripts can use either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from postillon.admin import suspensions
from postillon.admin.queue_ops import (
    ACTIONS,
    MessageFilter,
    QueueOpError,
    QueueOps,
    event_json,
    message_json,
)
from postillon.build import open_queue_store
from postillon.cli import queue_sts, queue_transfer
from postillon.config.model import Config
from postillon.core.clock import SystemClock
from postillon.intake.intake import Intake
from postillon.paths import queue_path
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import DeliveryState, MessageInfo, StoreError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` → seconds (argparse type)."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 3d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "queue",
        help="list, show and act on queued mail",
        description="Inspect and manage the mail queue (works while the server runs). "
        "Every command but raw takes --json for scripts; the output matches the admin API.",
    )
    qsub = q.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    ls = qsub.add_parser(
        "list",
        help="list queued messages (filters combine)",
        description="List queued messages in arrival order. Filters combine; ages take "
        "90s, 15m, 2h, 3d.",
    )
    ls.add_argument(
        "--state",
        choices=[s.value for s in DeliveryState],
        help="only messages with a recipient in this state",
    )
    ls.add_argument("--sender", help="sender contains this (case-insensitive); <> = null sender")
    ls.add_argument("--recipient", help="a recipient contains this (case-insensitive)")
    ls.add_argument("--domain", help="a recipient in this domain")
    ls.add_argument("--older-than", type=duration, metavar="AGE", help="received before AGE ago")
    ls.add_argument("--newer-than", type=duration, metavar="AGE", help="received within AGE")
    ls.add_argument("--offset", type=int, default=0, help="skip this many messages")
    ls.add_argument("--limit", type=int, default=1000, help="show at most this many (1000)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    show = qsub.add_parser(
        "show", help="one message: envelope, per-recipient state, headers, history"
    )
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    queue_sts.add_parser(qsub)

    for name in ("summary", "qshape"):
        s = qsub.add_parser(
            name,
            help="queue shape: counts by state, destination domain and age"
            + (" (= summary)" if name == "qshape" else ""),
            description="Queued recipients per destination domain and age bucket "
            "(minutes, as Postfix's qshape), counts by state, and the oldest message.",
        )
        s.add_argument("--json", action="store_true", help="machine-readable output")

    ev = qsub.add_parser(
        "events",
        help="a message's history: received, each delivery attempt, operator actions",
        description="The history of one message, oldest first; kept after the message "
        "left the queue (see [admin] history_days).",
    )
    ev.add_argument("queue_id")
    ev.add_argument("--json", action="store_true", help="machine-readable output")

    raw = qsub.add_parser("raw", help="write the stored message to stdout (as delivered)")
    raw.add_argument("queue_id")

    for name, text in (
        ("retry", "try the deferred recipients of a message now"),
        ("hold", "stop delivery attempts for a message until released"),
        ("release", "release a held message; it is tried again now"),
        ("delete", "remove a message from the queue (no bounce)"),
        (
            "bounce",
            "fail the message's remaining recipients now and send the sender a "
            "delivery status notification",
        ),
    ):
        p = qsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("queue_id", nargs="+")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    sp = qsub.add_parser(
        "suspend",
        help="stop new connections to a destination for a while (its mail waits)",
        description="Suspend deliveries to DEST: a recipient domain, or an [[shaping]] "
        "rule's mx:.suffix. Messages for it wait without counting an attempt.",
    )
    sp.add_argument("destination", metavar="DEST")
    sp.add_argument(
        "--for", dest="seconds", type=duration, default=3600.0, help="how long (default 1h)"
    )
    sp.add_argument("--reason", default="", help="shown in the queue summary and admin page")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    rs = qsub.add_parser(
        "resume", help="lift a destination's suspension; its deferred mail goes now"
    )
    rs.add_argument("destination", metavar="DEST")
    rs.add_argument("--json", action="store_true", help="machine-readable output")
    fl = qsub.add_parser("flush", help="try every deferred message now")
    fl.add_argument("--json", action="store_true", help="machine-readable output")
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
    clock = SystemClock()
    # Bounces queue their notice through intake, into the same store; the
    # server's runner finds it at its next poll.
    intake = Intake(store, config.hostname, config.data_dir / "spool", clock=clock)
    ops = QueueOps(store, clock, intake=intake, hostname=config.hostname, actor="cli")
    try:
        if args.queue_command in queue_transfer.COMMANDS:
            return await queue_transfer.run(args, store)
        if args.queue_command == "sts":
            return await queue_sts.run(args, store)
        return await _dispatch(args, ops)
    except QueueOpError as exc:
        print(f"postillon: {exc.message}", file=sys.stderr)
        return 1
    except (StoreError, SchemaError) as exc:  # e.g. the shared queue's database is down
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _console() -> Console:
    # Piped output (scripts, grep) gets wide lines instead of folded cells.
    return Console(width=None if sys.stdout.isatty() else 200)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


async def _dispatch(args: argparse.Namespace, ops: QueueOps) -> int:
    cmd = args.queue_command
    if cmd == "list":
        return await _list(args, ops)
    if cmd == "show":
        return await _show(args, ops)
    if cmd in ("summary", "qshape"):
        return await _summary(args, ops)
    if cmd == "events":
        return await _events(args, ops)
    if cmd == "raw":
        return await _raw(args, ops)
    if cmd in ACTIONS:
        return await _act(args, ops)
    if cmd in ("suspend", "resume"):
        return await _suspension(args, ops)
    if cmd == "flush":
        n = await ops.flush()
        if getattr(args, "json", False):
            _print_json({"action": "flush", "recipients": n})
        else:
            print(f"{n} deferred recipient(s) scheduled for immediate delivery")
        return 0
    raise AssertionError(cmd)


async def _list(args: argparse.Namespace, ops: QueueOps) -> int:
    state = getattr(args, "state", None)
    where = MessageFilter(
        state=DeliveryState(state) if state else None,
        sender=getattr(args, "sender", None),
        recipient=getattr(args, "recipient", None),
        domain=getattr(args, "domain", None),
        min_age=getattr(args, "older_than", None),
        max_age=getattr(args, "newer_than", None),
    )
    total, messages = await ops.find(
        where, max(0, getattr(args, "offset", 0)), max(1, getattr(args, "limit", 1000))
    )
    now = ops.clock.now()
    if args.json:
        _print_json([message_json(m, now) for m in messages])
        return 0
    console = _console()
    if not messages:
        console.print("Queue is empty." if total == 0 else f"No message on this page of {total}.")
        return 0
    shown = f"{len(messages)} of {total}" if len(messages) < total else str(total)
    table = Table(title=f"{shown} message(s) in the queue")
    table.add_column("Queue ID", no_wrap=True, min_width=17)
    for col in ("Received", "Age", "Size", "Sender", "Recipient", "State", "Last reply"):
        table.add_column(col, overflow="fold")
    table.add_column("Lease holder", overflow="fold")  # the node delivering it right now
    for m in messages:
        for i, r in enumerate(m.records):
            first = i == 0
            table.add_row(
                m.queue_id if first else "",
                _when(m.received_at) if first else "",
                _age(now - m.received_at) if first else "",
                str(m.size) if first else "",
                (m.sender or "<>") if first else "",
                r.recipient,
                r.state.value,
                str(r.last_reply) if r.last_reply else "",
                r.lease_owner or "",
            )
    console.print(table)
    return 0


async def _show(args: argparse.Namespace, ops: QueueOps) -> int:
    try:
        info = await ops.get(args.queue_id)
    except QueueOpError:
        print(f"postillon: no message {args.queue_id} in the queue", file=sys.stderr)
        return 1
    headers = await _headers_or_none(ops, info)
    tls = await ops.recipient_tls(info.queue_id)  # each recipient's last attempt
    if args.json:
        shown = message_json(info, ops.clock.now())
        shown["headers"] = [{"name": n, "value": v} for n, v in headers]
        for recipient in shown["recipients"]:
            recipient["tls"] = tls.get(recipient["recipient"])
        _print_json(shown)
        return 0
    console = _console()
    console.print(f"[bold]{info.queue_id}[/bold]  from <{info.sender}>  {info.size} bytes")
    console.print(f"received {_when(info.received_at)} UTC from {info.client} via {info.source}")
    subject = next((v for n, v in headers if n.lower() == "subject"), None)
    if subject is not None:
        console.print(f"subject: {subject}", markup=False)
    table = Table()
    columns = (
        "Recipient",
        "State",
        "Attempts",
        "Next try (UTC)",
        "Last reply",
        "TLS",
        "Lease holder",
    )
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in info.records:
        table.add_row(
            r.recipient + (f"\n(was {r.original_recipient})" if r.original_recipient else ""),
            r.state.value,
            str(r.attempts),
            _when(r.next_try) if r.state in (DeliveryState.DEFERRED, DeliveryState.PENDING) else "",
            str(r.last_reply) if r.last_reply else "",
            _tls_cell(tls.get(r.recipient)),
            r.lease_owner or "",
        )
    console.print(table)
    await _print_events(console, ops, info.queue_id)
    return 0


def _tls_cell(tls: dict[str, Any] | None) -> str:
    """``TLSv1.3 verified (mta-sts) mx.example.net``; "" before an SMTP attempt."""
    if tls is None:
        return ""
    verdict = "verified" if tls["verified"] else f"not verified: {tls['result']}"
    return f"{tls['version'] or 'no TLS'} {verdict} ({tls['policy']}) {tls['mx'] or ''}".strip()


async def _headers_or_none(ops: QueueOps, info: MessageInfo) -> list[tuple[str, str]]:
    try:
        return await ops.headers(info.queue_id)
    except QueueOpError:
        return []  # delivered meanwhile


async def _summary(args: argparse.Namespace, ops: QueueOps) -> int:
    summary = await ops.summary()
    if args.json:
        _print_json(summary)
        return 0
    console = _console()
    states = ", ".join(f"{k} {v}" for k, v in summary["by_state"].items() if v)
    console.print(
        f"{summary['messages']} message(s), {summary['queued_recipients']} queued "
        f"recipient(s); records by state: {states or 'none'}"
    )
    if summary["oldest_queue_id"]:
        console.print(
            f"oldest: {summary['oldest_queue_id']} ({_age(summary['oldest_age_seconds'])} old)"
        )
    buckets = summary["age_buckets_minutes"]
    table = Table(title="Queued recipients by domain and age (minutes)")
    table.add_column("Domain")
    table.add_column("Total", justify="right")
    for i, lower in enumerate(buckets):
        table.add_column(f"{lower}+" if i == len(buckets) - 1 else str(lower), justify="right")
    table.add_column("States")
    for row in summary["by_domain"]:
        table.add_row(
            row["domain"],
            str(row["total"]),
            *(str(n) if n else "." for n in row["by_age"]),
            ", ".join(f"{k} {v}" for k, v in sorted(row["by_state"].items())),
        )
    console.print(table)
    _print_suspensions(console, summary["suspensions"])
    return 0


def _print_suspensions(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(title="Suspended destinations (no new connections; mail waits)")
    for column in ("Destination", "Until (UTC)", "Left", "Reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["destination"],
            row["until"],
            _age(row["remaining_seconds"]),
            ("operator: " if row["by_operator"] else "") + row["reason"],
        )
    console.print(table)


async def _suspension(args: argparse.Namespace, ops: QueueOps) -> int:
    now = ops.clock.now()
    try:
        if args.queue_command == "suspend":
            result = await suspensions.suspend(
                ops.store, args.destination, now, args.seconds, args.reason
            )
        else:
            result = await suspensions.resume(ops.store, args.destination, now)
    except ValueError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(result)
    elif args.queue_command == "suspend":
        print(f"{result['destination']}: suspended until {result['until']}")
    elif result["resumed"]:
        print(f"{result['destination']}: resumed; {result['recipients']} recipient(s) due now")
    else:
        print(f"postillon: {result['destination']} is not suspended", file=sys.stderr)
        return 1
    return 0


async def _events(args: argparse.Namespace, ops: QueueOps) -> int:
    events = await ops.events(args.queue_id)
    in_queue = await ops.store.get_message(args.queue_id) is not None
    if not events and not in_queue:
        print(
            f"postillon: no message {args.queue_id} in the queue and no history of it",
            file=sys.stderr,
        )
        return 1
    if args.json:
        _print_json(
            {
                "queue_id": args.queue_id,
                "in_queue": in_queue,
                "events": [event_json(e) for e in events],
            }
        )
        return 0
    await _print_events(_console(), ops, args.queue_id)
    return 0


async def _print_events(console: Console, ops: QueueOps, queue_id: str) -> None:
    events = await ops.events(queue_id)
    if not events:
        return
    table = Table(title="History")
    table.add_column("Time (UTC)", no_wrap=True)
    table.add_column("Event")
    table.add_column("Details", overflow="fold")
    for e in events:
        details = ", ".join(f"{k}={v}" for k, v in e.fields.items())
        table.add_row(_when(e.at), e.event, details)
    console.print(table)


async def _raw(args: argparse.Namespace, ops: QueueOps) -> int:
    out = sys.stdout.buffer
    try:
        for chunk in [chunk async for chunk in ops.raw(args.queue_id)]:
            out.write(chunk)
    except KeyError:
        print(f"postillon: no message {args.queue_id} in the queue", file=sys.stderr)
        return 1
    out.flush()
    return 0


_DONE = {
    "retry": "scheduled for delivery now",
    "hold": "held",
    "release": "released",
    "delete": "deleted",
    "bounce": "bounced to the sender",
}


async def _act(args: argparse.Namespace, ops: QueueOps) -> int:
    action = args.queue_command
    results: list[dict[str, Any]] = []
    failed = 0
    for queue_id in args.queue_id:
        try:
            result = await ops.apply(action, queue_id)
        except QueueOpError as exc:
            failed += 1
            print(f"postillon: {queue_id}: {exc.message}", file=sys.stderr)
            continue
        results.append(result)
        if not args.json:
            if action == "delete":
                print(f"{queue_id}: deleted")
            else:
                print(f"{queue_id}: {result['recipients']} recipient(s) {_DONE[action]}")
    if args.json:
        _print_json(results)
    return 1 if failed else 0
