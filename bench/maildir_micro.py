#!/usr/bin/env python3
"""The Maildir delivery path alone: N messages into one mailbox from T threads.

No SMTP, no queue: ``MaildirDelivery.deliver`` called from a thread pool the size of
the event loop's default executor (what ``MaildirTransport`` uses), each message 4 KiB
with a queue-style ``delivery_key``. Prints messages/s, this process's user and system
CPU per message, context switches per message, and fsyncs of ``new/`` per message (1.0
without sharing; less when concurrent deliveries share one, ``local/dirsync.py``).

A/B against another source tree (a worktree at main) by running it twice::

    .venv/bin/python bench/maildir_micro.py --reps 3
    PYTHONPATH=/path/to/main/src .venv/bin/python bench/maildir_micro.py --reps 3

Each run writes into a fresh directory under ``--root`` and deletes nothing: on ext4
without a journal, creating a file scans past inodes freed in the last minute or more
(``recently_deleted``), which made a run after a deletion 4x slower in system time.
Delete ``--root`` after the last run (``--clean``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from postillon.core.outcome import Delivered
from postillon.local.maildir import MaildirDelivery

BODY = [b"Subject: micro\r\n\r\n" + (b"X" * 76 + b"\r\n") * 52]


def one_run(root: Path, n: int, threads: int) -> str:
    maildir = MaildirDelivery(root, hostname="bench.local")
    maildir.deliver("rcpt@bench.test", BODY, return_path="s@bench.test")  # creates it

    def deliver(i: int) -> object:
        return maildir.deliver(
            "rcpt@bench.test", BODY, return_path="s@bench.test", delivery_key=f"1.Q{i}R{i}"
        )

    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(deliver, range(n)))
    seconds, after = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    bad = [o for o in outcomes if not isinstance(o, Delivered)]
    if bad:
        raise SystemExit(f"{len(bad)} deliveries failed, first: {bad[0]}")
    sharing = getattr(maildir, "directory_sync", None)
    dir_fsyncs = f"{sharing.fsyncs / n:.2f}" if sharing is not None else "1.00 (no sharing)"
    return (
        f"{n / seconds:6.0f} msg/s, user {(after.ru_utime - before.ru_utime) * 1000 / n:.3f} "
        f"sys {(after.ru_stime - before.ru_stime) * 1000 / n:.3f} ms/msg, "
        f"context switches {(after.ru_nvcsw - before.ru_nvcsw) / n:.1f}/msg, "
        f"new/ fsyncs {dir_fsyncs}/msg"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2000, help="messages per run")
    ap.add_argument("--threads", type=int, default=min(32, (os.cpu_count() or 1) + 4))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path("/var/tmp/postillon-maildir-micro"))
    ap.add_argument(
        "--clean",
        action="store_true",
        help="delete --root at the end (the next minute of file creations on the file "
        "system pays for it: run the A/B first, clean last)",
    )
    a = ap.parse_args()
    import postillon.local.maildir as code

    print(f"code: {Path(code.__file__).parent}, {a.threads} threads, N={a.n}")
    try:
        for rep in range(a.reps):
            print(f"run {rep + 1}: {one_run(a.root / f'run-{time.time_ns()}', a.n, a.threads)}")
    finally:
        if a.clean:
            shutil.rmtree(a.root, ignore_errors=True)


if __name__ == "__main__":
    main()
