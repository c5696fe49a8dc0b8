#!/usr/bin/env python3
"""Fresh relay with a backlog of deferred mail (issue 19, target 4: flat cost as work grows).

`make bench` runs this after ``cluster_bench.py``. For each store (``--store sqlite``,
``postgres`` or ``both``), one postillon node relays fresh mail (Postfix's
``smtp-source``: N messages of SIZE bytes over CONC sessions, one message per session, to
``user@bench.test``) to one ``smtp-sink``, every default on (fsync before 250), in three
phases:

* ``empty``: an empty queue (the reference);
* ``waiting``: BACKLOG messages already deferred for ``dead.test``, due in an hour;
* ``wave``: the same backlog's retry wave starts WAVE_DELAY (1 s) after the fresh load
  starts (its ``next_try`` set just before, by the bench, in the store) and runs while
  fresh mail arrives. ``--wave spread`` (the default): the records come due at
  ``--wave-rate`` per second (800), as a backlog that was deferred while arriving at
  that rate comes back for its first retry (the issue's measurement);
  ``--wave instant``: all at once, the worst case.

``dead.test`` is routed to a loopback port where nothing listens (connection refused).
``--seed sql`` (the default) writes the backlog straight into the queue store with the
rows a real deferral leaves (message, body, one record: DEFERRED, 1 attempt, priority
1, the refusal as the last reply, next try in about an hour) and restarts the node, as
after a day of queueing: seconds for 100,000. ``--seed smtp`` sends it through the
running node instead (smtp-source to ``dead.test``, each message then attempted or
postponed by the node itself) and keeps that node: minutes, but the memory it measures
includes whatever accepting and deferring the backlog left behind.

Per phase: **end-to-end msg/s** of the fresh mail (N / time from the first send until
every fresh record left the queue), the **peak PSS** of the node's process tree
(``/proc/PID/smaps_rollup``, sampled every 0.1 s), and after the phase the wall time of
``postillon queue summary`` (a CLI process, start-up included). The report gives the
ratios against ``empty``. Everything lives under ``--bench-root``; results
(``summary.md``, ``runs.jsonl``) under ``--results-dir/<UTC stamp>-backlog``.

    .venv/bin/python bench/backlog_bench.py [--store both] [--n 2000] [--backlog 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_bench import (
    SMTP_SOURCE,
    Bench,
    children,
    listening,
    say,
)

from postillon.core.reply import Reply
from postillon.queue.codec import encode_reply
from support.ports import free_port
from support.postgres import PostgresServer

PHASES = ("empty", "waiting", "wave")
WAVE_DELAY = 1.0  # seconds into the fresh load when the backlog comes due
REFUSED = encode_reply(Reply.of(451, "4.4.1", "Connection failed: Connection refused"))
BACKLOG_BODY = b"From: bulk@bench.local\r\nSubject: backlog\r\n\r\n" + b"x" * 1000 + b"\r\n"


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class PeakPss:
    """Samples the PSS of a process tree every 0.1 s in a thread; ``peak`` in MiB."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_kib([self.root, *children(self.root)]))
            self._stop.wait(0.1)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class BacklogBench(Bench):
    def __init__(self, a: argparse.Namespace) -> None:
        os.environ["BENCH_ROOT"] = a.bench_root
        os.environ["RESULTS_DIR"] = a.results_dir
        super().__init__(a)
        self.out.rename(self.out.with_name(self.out.name.replace("-cluster", "-backlog")))
        self.out = self.out.with_name(self.out.name.replace("-cluster", "-backlog"))
        self.sink_port = a.sink_port or free_port()
        self.dead_port = a.dead_port or free_port()
        self.node_port = a.port or free_port()

    def node_config(self, index: int, port: int, dsn: str | None) -> Path:
        cfg = super().node_config(index, port, dsn)
        text = cfg.read_text().replace("first_retry = 3600\nmax_retry = 3600\n", "")
        text += f"""
[[transport]]
domain = "dead.test"
route = "smtp:[127.0.0.1]:{self.dead_port}"
"""
        cfg.write_text(text)
        return cfg

    def start_node(self, dsn: str | None, fresh: bool) -> int:
        """Start node0 on ``node_port``; ``fresh=False`` keeps its data (the backlog)."""
        if fresh:
            return self.start_nodes(1, dsn)[0]
        saved = self.root / "node0-data"
        (self.root / "node0" / "data").rename(saved)
        cfg = self.node_config(0, self.node_port, dsn)  # a new node directory
        saved.rename(cfg.parent / "data")
        return self._spawn(cfg)

    def _spawn(self, cfg: Path) -> int:
        log = open(cfg.parent / "stderr.log", "ab")  # noqa: SIM115 - child owns it
        self.nodes.append(
            subprocess.Popen(
                [str(self.exe), "--config", str(cfg), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
        for _ in range(600):
            if listening(self.node_port):
                return self.node_port
            time.sleep(0.05)
        raise SystemExit(f"postillon did not start (see {cfg.parent})")

    def start_nodes(self, count: int, dsn: str | None) -> list[int]:
        cfg = self.node_config(0, self.node_port, dsn)
        if dsn is not None:
            subprocess.run(
                [str(self.exe), "--config", str(cfg), "db", "migrate"],
                check=True,
                capture_output=True,
            )
        return [self._spawn(cfg)]

    # -- the backlog ----------------------------------------------------------
    def seed(self, dsn: str | None) -> float:
        """BACKLOG deferred messages for dead.test in the node's queue (``--seed``)."""
        started = time.monotonic()
        now = time.time()
        count = self.a.backlog
        if self.a.seed == "smtp":
            self.source(count, "u@dead.test", size=1024)
            deadline = time.monotonic() + 1800
            while self.query(dsn, "SELECT count(*) FROM records WHERE state <> 'deferred'"):
                if time.monotonic() > deadline:
                    raise SystemExit("the backlog was not deferred in 1800 s")
                time.sleep(1.0)
        elif dsn is None:
            self._seed_sqlite(now, count)
        else:
            asyncio.run(self._seed_postgres(dsn, now, count))
        return time.monotonic() - started

    def _seed_sqlite(self, now: float, count: int) -> None:
        db = sqlite3.connect(self.root / "node0" / "data" / "queue" / "queue.db", timeout=30)
        try:
            for start in range(0, count, 10_000):
                batch = range(start, min(start + 10_000, count))
                db.executemany(
                    "INSERT INTO messages VALUES (?, 'bulk@bench.local', '{}', ?, ?, ?, 'smtp')",
                    [(f"0BACKLOG{i:09d}", len(BACKLOG_BODY), now - 600, "bench") for i in batch],
                )
                db.executemany(
                    "INSERT INTO bodies (queue_id, seq, data) VALUES (?, 0, ?)",
                    [(f"0BACKLOG{i:09d}", BACKLOG_BODY) for i in batch],
                )
                db.executemany(
                    "INSERT INTO records (queue_id, recipient, rcpt_params, state, attempts,"
                    " next_try, last_reply, updated_at, priority)"
                    " VALUES (?, ?, '{}', 'deferred', 1, ?, ?, ?, 1)",
                    [
                        (f"0BACKLOG{i:09d}", f"u{i}@dead.test", now + 3600 + i % 600, REFUSED, now)
                        for i in batch
                    ],
                )
                db.commit()
        finally:
            db.close()

    async def _seed_postgres(self, dsn: str, now: float, count: int) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO messages SELECT '0BACKLOG' || lpad(i::text, 9, '0'),"
                " 'bulk@bench.local', '{}', $1, $2, 'bench', 'smtp'"
                " FROM generate_series(0, $3 - 1) i",
                len(BACKLOG_BODY),
                now - 600,
                count,
            )
            await conn.execute(
                "INSERT INTO bodies SELECT '0BACKLOG' || lpad(i::text, 9, '0'), 0, $1"
                " FROM generate_series(0, $2 - 1) i",
                BACKLOG_BODY,
                count,
            )
            await conn.execute(
                "INSERT INTO records (queue_id, recipient, rcpt_params, state, attempts,"
                " next_try, last_reply, updated_at, priority)"
                " SELECT '0BACKLOG' || lpad(i::text, 9, '0'), 'u' || i || '@dead.test', '{}',"
                " 'deferred', 1, $1 + i % 600, $2, $3, 1 FROM generate_series(0, $4 - 1) i",
                now + 3600,
                REFUSED,
                now,
                count,
            )
            await conn.execute("VACUUM ANALYZE records")
        finally:
            await conn.close()

    # -- measuring ------------------------------------------------------------
    def query(self, dsn: str | None, sql: str) -> Any:
        """The one value ``sql`` selects from the node's queue."""
        if dsn is None:
            db = sqlite3.connect(self.root / "node0" / "data" / "queue" / "queue.db", timeout=30)
            try:
                return db.execute(sql).fetchone()[0]
            finally:
                db.close()

        async def value() -> Any:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()

        return asyncio.run(value())

    def make_due(self, dsn: str | None, at: float, spread: float) -> None:
        """The backlog due from ``at`` over ``spread`` seconds, in record order
        (written in the store, the node running)."""
        dead = "state = 'deferred' AND recipient LIKE '%@dead.test'"
        first = self.query(dsn, f"SELECT MIN(record_id) FROM records WHERE {dead}") or 0
        step = spread / max(self.a.backlog, 1)
        sql = (
            f"UPDATE records SET next_try = {at!r} + (record_id - {first}) * {step!r} WHERE {dead}"
        )
        if dsn is None:
            db = sqlite3.connect(self.root / "node0" / "data" / "queue" / "queue.db", timeout=60)
            try:
                db.execute(sql)
                db.commit()
            finally:
                db.close()
            return

        async def update() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(update())

    def fresh_left(self, dsn: str | None, after: str) -> int:
        """Fresh records still queued (queue ids sort by time: after the backlog's)."""
        return int(self.query(dsn, f"SELECT count(*) FROM records WHERE queue_id > '{after}'"))

    def source(self, count: int, rcpt: str, size: int) -> None:
        subprocess.run(
            [
                *(SMTP_SOURCE, "-s", str(self.a.conc), "-m", str(count), "-l", str(size)),
                *("-f", "load@bench.local", "-t", rcpt, f"127.0.0.1:{self.node_port}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    def cli(self, *args: str) -> float:
        cfg = self.root / "node0" / "postillon.toml"
        started = time.monotonic()
        subprocess.run(
            [str(self.exe), "--config", str(cfg), *args], check=True, capture_output=True
        )
        return time.monotonic() - started

    def relay_fresh(self, dsn: str | None) -> tuple[float, int]:
        """(end-to-end msg/s of N fresh messages, peak PSS MiB)."""
        a = self.a
        after = self.query(dsn, "SELECT COALESCE(MAX(queue_id), '') FROM messages")
        with PeakPss(self.nodes[0].pid) as pss:
            start = time.monotonic()
            self.source(a.n, "user@bench.test", a.size)
            deadline = time.monotonic() + 600
            while self.fresh_left(dsn, after) > 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the fresh mail did not drain in 600 s")
                time.sleep(0.05)
            e2e = a.n / (time.monotonic() - start)
        return e2e, pss.peak // 1024

    def run_store(self, store: str) -> list[dict[str, Any]]:
        dsn = self.new_database() if store == "postgres" else None
        runs = []
        self.start_node(dsn, fresh=True)
        try:
            for phase in PHASES:
                if phase == "waiting" and self.a.seed == "sql":
                    self.stop_nodes()
                    seeded = self.seed(dsn)
                    self.start_node(dsn, fresh=False)
                    time.sleep(1.0)  # let start-up work (lease recovery) finish
                elif phase == "waiting":
                    seeded = self.seed(dsn)
                if phase == "waiting":
                    say(f"   {store}: seeded {self.a.backlog} deferred messages in {seeded:.1f} s")
                if phase == "wave":
                    spread = self.a.backlog / self.a.wave_rate if self.a.wave == "spread" else 0
                    self.make_due(dsn, time.time() + WAVE_DELAY, spread)
                e2e, peak = self.relay_fresh(dsn)
                summary_s = self.cli("queue", "summary")
                run = {
                    "store": store,
                    "phase": phase,
                    "n": self.a.n,
                    "backlog": 0 if phase == "empty" else self.a.backlog,
                    "e2e_per_s": e2e,
                    "peak_pss_mib": peak,
                    "summary_s": summary_s,
                }
                say(
                    f"   {store:8s} {phase:8s} end-to-end {e2e:7.0f} msg/s, peak PSS "
                    f"{peak} MiB, queue summary {summary_s:.2f} s"
                )
                runs.append(run)
        finally:
            self.stop_nodes()
        return runs

    def run(self) -> None:  # type: ignore[override]
        a = self.a
        say(f"== backlog bench: N={a.n} BACKLOG={a.backlog} CONC={a.conc} SIZE={a.size}")
        say(f"   results in {self.out}")
        self.root.mkdir(parents=True, exist_ok=True)
        stores = ("sqlite", "postgres") if a.store == "both" else (a.store,)
        if "postgres" in stores:
            self.pg = PostgresServer().start()
        self.start_sink()
        try:
            for _ in range(a.reps):
                for store in stores:
                    self.runs.extend(self.run_store(store))
        finally:
            if self.sink is not None:
                self.sink.terminate()
                self.sink.wait()
            if self.pg is not None:
                self.pg.cleanup()
        with open(self.out / "runs.jsonl", "w") as f:
            for run in self.runs:
                f.write(json.dumps(run) + "\n")
        text = self.report()
        (self.out / "summary.md").write_text(text)
        say(text)

    def report(self) -> str:
        lines = [
            f"backlog bench: N={self.a.n} fresh, BACKLOG={self.a.backlog} deferred, "
            f"(seeded by {self.a.seed}, wave {self.a.wave}), CONC={self.a.conc}, "
            f"SIZE={self.a.size} "
            f"(medians of {self.a.reps} rep(s))",
            "",
            "| store | phase | e2e msg/s | vs empty | peak PSS MiB | queue summary s |",
            "|---|---|---|---|---|---|",
        ]
        for store in dict.fromkeys(r["store"] for r in self.runs):

            def med(phase: str, key: str, store: str = store) -> float:
                vals = sorted(
                    r[key] for r in self.runs if (r["store"], r["phase"]) == (store, phase)
                )
                return float(vals[len(vals) // 2])

            base = med("empty", "e2e_per_s")
            for phase in PHASES:
                e2e = med(phase, "e2e_per_s")
                lines.append(
                    f"| {store} | {phase} | {e2e:.0f} | {e2e / base:.2f} | "
                    f"{med(phase, 'peak_pss_mib'):.0f} | {med(phase, 'summary_s'):.2f} |"
                )
        return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--n", type=int, default=2000, help="fresh messages per phase")
    p.add_argument("--backlog", type=int, default=100_000, help="deferred messages queued")
    p.add_argument("--conc", type=int, default=20, help="parallel smtp-source sessions")
    p.add_argument("--size", type=int, default=4096, help="fresh message size in bytes")
    p.add_argument("--seed", choices=("sql", "smtp"), default="sql", help="see above")
    p.add_argument("--wave", choices=("spread", "instant"), default="spread", help="see above")
    p.add_argument("--wave-rate", type=float, default=800.0, help="records due per second")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="the node's SMTP port (0: free)")
    p.add_argument("--sink-port", type=int, default=0, help="smtp-sink's port (0: free)")
    p.add_argument("--dead-port", type=int, default=0, help="where nothing listens (0: free)")
    p.add_argument("--bench-root", default="/var/tmp/postillon-backlog-bench")
    p.add_argument("--results-dir", default="/tmp/postillon-bench")
    BacklogBench(p.parse_args()).run()


if __name__ == "__main__":
    main()
