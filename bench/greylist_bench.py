#!/usr/bin/env python3
"""Greylisting state checks per second on the embedded store (SQLite), the port-25 hot path.

A busy MX sees the same senders all day, so most checks are of triplets that passed
long ago. Those are answered from a read alone (``queue/greylist_state.py``: no write
while ``last_seen`` is fresher than ``refresh_after``); a new or stale triplet costs a
write (a share of a group-committed fsync). This prints both rates, ``--n`` checks run
concurrently (as concurrent sessions would), and the time one check takes alone
(what one RCPT waits), on a fresh queue in a temp dir.

    .venv/bin/python bench/greylist_bench.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import GreylistPolicy

T0 = 1_800_000_000.0
NET = "192.0.2.0/24"


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "queue.db")
        grey = store.policy_state.greylist
        policy = GreylistPolicy(delay=0, expiry=35 * 86400, auto_allow_after=0)
        for i in range(50):  # 50 triplets that passed
            await grey.check(NET, "a@x.test", f"r{i}@y.test", T0, policy)
            await grey.check(NET, "a@x.test", f"r{i}@y.test", T0 + 1, policy)
        start = time.perf_counter()
        await asyncio.gather(
            *(grey.check(NET, "a@x.test", f"r{i % 50}@y.test", T0 + 2, policy) for i in range(n))
        )
        passed = n / (time.perf_counter() - start)
        start = time.perf_counter()
        await asyncio.gather(
            *(grey.check(NET, f"s{i}@x.test", "r@y.test", T0 + 2, policy) for i in range(n))
        )
        new = n / (time.perf_counter() - start)
        # One session's view: checks one after another (the latency a RCPT waits).
        start = time.perf_counter()
        for i in range(200):
            await grey.check(NET, "a@x.test", f"r{i % 50}@y.test", T0 + 3, policy)
        passed_ms = (time.perf_counter() - start) / 200 * 1000
        start = time.perf_counter()
        for i in range(200):
            await grey.check(NET, f"t{i}@x.test", "r@y.test", T0 + 3, policy)
        new_ms = (time.perf_counter() - start) / 200 * 1000
        await store.close()
    print(f"passed triplets (read only): {passed:,.0f} checks/s, {passed_ms:.2f} ms each alone")
    print(f"new triplets (a write each): {new:,.0f} checks/s, {new_ms:.2f} ms each alone")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000, help="concurrent checks per run")
    asyncio.run(main(ap.parse_args().n))
