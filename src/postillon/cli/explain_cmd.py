"""``postillon explain``: why a session or message was accepted, refused or marked.

``explain ID`` (a queue id or a session id) prints the story from the decision
trace in the queue store; ``explain --client IP`` lists that client's recent
sessions (``--rejected``: only those where something was refused); ``explain
--simulate FILE --client IP --helo NAME --from ADDR --to ADDR`` replays a saved
message through this config's port-25 pipeline without queueing it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from postillon.build import Builder, open_queue_store
from postillon.checks.context import ClientFacts
from postillon.checks.pipeline import build_pipeline
from postillon.checks.simulate import ListSink, Simulation, simulate
from postillon.checks.story import as_json, by_session, story
from postillon.config.model import Config
from postillon.core.clock import SystemClock
from postillon.core.queueid import is_queue_id
from postillon.core.trace import TraceStep
from postillon.helpers.pool import HelperPool
from postillon.observability.maillog import null_maillog
from postillon.observability.metrics import Metrics
from postillon.paths import queue_path
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import QueueStore, StoreError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from postillon.cli.queue_cmd import duration

    p = sub.add_parser(
        "explain",
        help="why a message or session was accepted, refused or marked",
        description="Tell the story of a message (queue id) or SMTP session (session id) "
        "from the checks' decision trace; or list a client's sessions (--client); or "
        "replay a saved message through the checks without queueing it (--simulate).",
    )
    p.add_argument("id", nargs="?", help="a queue id or a session id (S...)")
    p.add_argument("--client", metavar="IP", help="the client's address")
    p.add_argument("--since", type=duration, default=86400.0, metavar="AGE",
                   help="with --client: how far back (default 1d; e.g. 2h, 3d)")  # fmt: skip
    p.add_argument("--rejected", action="store_true",
                   help="with --client: only sessions in which something was refused")  # fmt: skip
    p.add_argument("--limit", type=int, default=20, help="sessions shown at most")
    p.add_argument("--simulate", metavar="FILE", type=Path,
                   help="replay this message file (headers, empty line, body)")  # fmt: skip
    p.add_argument("--helo", default="", help="with --simulate: the client's HELO name")
    p.add_argument("--from", dest="sender", default="", help="with --simulate: MAIL FROM")
    p.add_argument("--to", action="append", default=[], metavar="ADDR",
                   help="with --simulate: a recipient (repeat for more)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        if args.simulate is not None:
            return asyncio.run(_simulate(args, config))
        if not args.id and not args.client:
            print("postillon explain: give an ID, --client IP or --simulate FILE", file=sys.stderr)
            return 2
        return asyncio.run(_explain(args, config))
    except (StoreError, SchemaError) as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1


def _print(groups: list[list[TraceStep]], as_json_output: bool) -> None:
    if as_json_output:
        print(json.dumps([[as_json(s) for s in g] for g in groups], indent=2, ensure_ascii=False))
        return
    for n, group in enumerate(groups):
        if n:
            print()
        print("\n".join(story(group)))


async def _explain(args: argparse.Namespace, config: Config) -> int:
    if config.queue.store == "sqlite" and not queue_path(config).exists():
        print(f"postillon: no queue at {queue_path(config)}", file=sys.stderr)
        return 1
    store: QueueStore = open_queue_store(config)
    try:
        if args.id:
            if is_queue_id(args.id):
                steps = await store.traces.message(args.id)
            else:
                steps = await store.traces.session(args.id)
            if not steps:
                print(f"postillon: nothing recorded for {args.id} (kept "
                      f"{config.explain.keep_hours:g}h)", file=sys.stderr)  # fmt: skip
                return 1
            _print([steps], args.json)
            return 0
        now = time.time()
        steps = await store.traces.sessions(
            args.client, now - args.since, now + 1, args.rejected, args.limit
        )
        if not steps:
            print(f"postillon: no sessions of {args.client} recorded", file=sys.stderr)
            return 1
        _print(by_session(steps), args.json)
        return 0
    finally:
        await store.close()


async def _simulate(args: argparse.Namespace, config: Config) -> int:
    if not args.client or not args.to:
        print("postillon explain --simulate: give --client IP and at least one --to",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        message = args.simulate.read_bytes()
    except OSError as exc:
        print(f"postillon: {args.simulate}: {exc.strerror}", file=sys.stderr)
        return 1
    config = config.model_copy(update={"helper_processes": 0})
    builder = Builder(Metrics(), null_maillog(), HelperPool(0))
    # The shared state (greylist triplets, rate counts) is read, never written (dry_run).
    has_queue = config.queue.store != "sqlite" or queue_path(config).exists()
    builder.store = open_queue_store(config) if has_queue else None
    try:
        return await _replay(args, config, builder, message)
    finally:
        if builder.store is not None:
            await builder.store.close()


async def _replay(
    args: argparse.Namespace, config: Config, builder: Builder, message: bytes
) -> int:
    policy = builder.policy(config)
    parts = replace(policy.parts, dry_run=True)
    sink = ListSink()
    clock = SystemClock()
    pipeline = build_pipeline("smtp", parts, sink)
    client = ClientFacts(
        ip=args.client,
        kind="smtp",
        hostname=config.hostname,
        helo=args.helo,
        trusted=policy.relay.is_trusted(args.client),
    )
    result = await simulate(
        pipeline, clock, sink, Simulation(client, args.sender, list(args.to), message)
    )
    if args.json:
        print(json.dumps({"outcome": result.outcome, "steps": [as_json(s) for s in result.steps]},
                         indent=2, ensure_ascii=False))  # fmt: skip
        return 0
    print("\n".join(story(result.steps)))
    print(f"outcome: {result.outcome}")
    return 0
