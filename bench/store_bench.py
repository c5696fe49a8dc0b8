"""Group-commit throughput of the embedded queue store.

N concurrent committers (think: SMTP sessions at end of DATA) each commit
messages of one recipient and a B-byte body as fast as the store lets them.
Prints messages/s, the number of batches (each one COMMIT = one WAL fsync)
and messages per batch. ``--spool-baseline`` also times the rejected design
(each body its own spool file). With ``--count-fsyncs`` the run repeats under
``strace -f -c`` and prints the fsync/fdatasync calls actually made (strace
slows the run down; only its counts matter).

    .venv/bin/python bench/store_bench.py --committers 20 --body 4096 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from postillon.core.envelope import MailParams
from postillon.core.queueid import new_queue_id
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import NewMessage, NewRecipient


async def run(path: Path, committers: int, body_size: int, seconds: float) -> dict[str, float]:
    store = SqliteStore(path)
    body = os.urandom(body_size)
    done = 0
    latencies: list[float] = []
    stop_at = 0.0

    async def committer(n: int) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            now = time.time()
            message = NewMessage(
                queue_id=new_queue_id(now),
                sender=f"sender{n}@example.org",
                mail_params=MailParams(size=body_size),
                recipients=[NewRecipient(f"rcpt{n}@example.net")],
                body=io.BytesIO(body),
                size=body_size,
                received_at=now,
                client="bench [127.0.0.1]",
                source="bench",
            )
            t0 = time.perf_counter()
            await store.commit(message)
            latencies.append(time.perf_counter() - t0)
            done += 1

    # Warm up (file creation, first WAL pages), then measure.
    stop_at = time.perf_counter() + 0.5
    await asyncio.gather(*(committer(i) for i in range(committers)))
    done, latencies = 0, []
    before = store.stats()
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*(committer(i) for i in range(committers)))
    elapsed = time.perf_counter() - start
    after = store.stats()
    await store.close()
    batches = after["batches"] - before["batches"]
    latencies.sort()
    return {
        "msgs": done,
        "elapsed": elapsed,
        "msgs_per_s": done / elapsed,
        "batches": batches,
        "msgs_per_batch": done / batches if batches else 0.0,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "all_batches": after["batches"],  # incl. warm-up, for the strace count
        "all_ops": after["ops"],
    }


def spool_baseline(directory: Path, threads: int, body_size: int, seconds: float) -> float:
    """The rejected alternative, bodies as spool files: tmp, fsync, rename, fsync
    the directory. Returns files/s, *before* any database commit of the records."""
    from concurrent.futures import ThreadPoolExecutor

    body = os.urandom(body_size)
    stop_at = time.perf_counter() + seconds
    counts = [0] * threads

    def worker(n: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            tmp, final = directory / f"t{n}.{i}", directory / f"m{n}.{i}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            i += 1
        counts[n] = i

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return sum(counts) / (time.perf_counter() - start)


def count_fsyncs(argv: list[str]) -> None:
    strace = shutil.which("strace")
    if strace is None:
        print("strace not found: cannot count fsyncs")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        cmd = [strace, "-f", "-c", "-o", str(out), "-e", "trace=fsync,fdatasync"]
        cmd += [sys.executable, __file__, *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print("--- under strace ---")
        print(result.stdout.strip())
        calls = 0
        for line in out.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$", line)
            if m:
                calls += int(m.group(1))
        msgs = batches = 0.0
        for line in result.stdout.splitlines():
            if line.startswith("RESULT "):
                fields = dict(kv.split("=") for kv in line.split()[1:])
                msgs, batches = float(fields["total_msgs"]), float(fields["total_batches"])
        print(
            f"fsync+fdatasync calls: {calls} for {msgs:.0f} msgs in {batches:.0f} batches"
            " (incl. warm-up, schema creation, checkpoints)"
        )
        if batches:
            print(f"fsyncs/batch: {calls / batches:.2f}   fsyncs/msg: {calls / msgs:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--committers", type=int, default=20)
    parser.add_argument("--body", type=int, default=4096, help="body size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the database")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--count-fsyncs", action="store_true", help="repeat under strace -c")
    parser.add_argument(
        "--spool-baseline", action="store_true", help="also time bodies as spool files"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        coro = run(Path(tmp) / "queue.db", args.committers, args.body, args.seconds)
        if args.uvloop:
            import uvloop

            r = uvloop.run(coro)
        else:
            r = asyncio.run(coro)
    print(
        f"{args.committers} committers, {args.body} B bodies, {r['elapsed']:.1f} s:"
        f" {r['msgs_per_s']:.0f} msgs/s, {r['batches']:.0f} batches (1 WAL fsync each),"
        f" {r['msgs_per_batch']:.1f} msgs/batch,"
        f" latency p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms"
    )
    print(f"RESULT total_msgs={r['all_ops']:.0f} total_batches={r['all_batches']:.0f}")
    if args.spool_baseline:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            rate = spool_baseline(Path(tmp), args.committers, args.body, args.seconds)
        print(
            f"spool-file alternative, {args.committers} threads: {rate:.0f} bodies/s"
            " (tmp + fsync + rename + directory fsync, before committing any record)"
        )
    if args.count_fsyncs:
        argv = [a for a in sys.argv[1:] if a != "--count-fsyncs"]
        count_fsyncs(argv)


if __name__ == "__main__":
    main()
