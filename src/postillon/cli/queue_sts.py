"""``postillon queue sts [DOMAIN]``: the MTA-STS policies cached in the queue store.

The cache outbound delivery uses (``outbound/sts_policies.py``; RFC 8461): one row per
recipient domain with the TXT id it was fetched under, the mode and ``mx`` patterns, when
it was fetched and expires, and the last failed refresh. Read-only; every node of a
cluster sees the same rows.
"""

from __future__ import annotations

import argparse
import json
import time

from postillon.core.sts import CachedPolicy
from postillon.queue.store import QueueStore


def add_parser(qsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = qsub.add_parser(
        "sts",
        help="MTA-STS policies cached for outbound delivery",
        description="The MTA-STS (RFC 8461) policies of recipient domains, as cached in "
        "the queue store: TXT id, mode, mx patterns, fetch and expiry times, last error.",
    )
    p.add_argument("domain", nargs="?", help="only this domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _as_dict(entry: CachedPolicy, now: float) -> dict[str, object]:
    return {
        "domain": entry.domain,
        "id": entry.policy_id,
        "mode": entry.policy.mode,
        "mx": list(entry.policy.mx),
        "max_age": entry.policy.max_age,
        "fetched_at": entry.fetched_at,
        "expires_at": entry.expires_at,
        "expired": not entry.fresh(now),
        "checked_at": entry.checked_at,
        "last_error": entry.last_error,
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


async def run(args: argparse.Namespace, store: QueueStore) -> int:
    now = time.time()
    if args.domain:
        one = await store.sts_policy(args.domain.lower().rstrip("."))
        entries = [one] if one is not None else []
    else:
        entries = await store.sts_policies()
    if args.json:
        print(json.dumps([_as_dict(e, now) for e in entries], indent=2))
        return 0
    if not entries:
        print("no MTA-STS policy cached" + (f" for {args.domain}" if args.domain else ""))
        return 0
    for e in entries:
        state = "expired" if not e.fresh(now) else f"expires {_when(e.expires_at)}"
        print(
            f"{e.domain}: mode {e.policy.mode}, mx {', '.join(e.policy.mx) or '-'}, "
            f"id {e.policy_id}, fetched {_when(e.fetched_at)}, {state}"
        )
        if e.last_error:
            print(f"  last refresh failed ({_when(e.checked_at)}): {e.last_error}")
    return 0
