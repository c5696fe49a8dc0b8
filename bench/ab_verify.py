#!/usr/bin/env python3
"""A/B: the verify server (inbound checks on) from two source trees, in one run.

The box's speed drifts by more than most changes are worth, so two versions are only
comparable when measured side by side. This starts the verify server of
``bench/verify_bench.py`` twice, once with ``PYTHONPATH=A`` and once with
``PYTHONPATH=B`` (each a ``src`` directory, e.g. of a ``git worktree``), and loads them
in alternating order::

    git worktree add /tmp/before HEAD~3
    .venv/bin/python bench/ab_verify.py /tmp/before/src src --reps 6

It prints msg/s, CPU ms/msg (with helper processes) and the event loop's ms/msg of
each round and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verify_bench import SENDER_DOMAIN, Server, load, make_keys, signed_message

from postillon.testing.dns_server import DnsServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="source tree A (a src directory)")
    ap.add_argument("b", type=Path, help="source tree B")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--conc", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/postillon-ab"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rsa_pem, ed_seed, zone = make_keys()
    message = args.out / "signed.eml"
    message.write_bytes(signed_message(4096, rsa_pem, ed_seed))
    rows: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
    with DnsServer({SENDER_DOMAIN: zone}) as dns:
        servers = {}
        for name, src in (("A", args.a), ("B", args.b)):
            os.environ["PYTHONPATH"] = str(src.resolve())
            servers[name] = Server(args.out / name, dns.nameserver, verify=True)
        os.environ.pop("PYTHONPATH")
        try:
            for server in servers.values():
                load(server, message, 500, args.conc)
            for rep in range(args.reps):
                for name in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                    result = load(servers[name], message, args.n, args.conc)
                    rows[name].append(result)
                    print(f"  {name}: {result[0]:.0f} msg/s, {result[1]:.2f} CPU ms/msg, "
                          f"{result[2]:.2f} loop ms/msg", flush=True)  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    for name, runs in rows.items():
        rate, cpu, loop = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{name}: median {rate:.0f} msg/s, {cpu:.2f} CPU ms/msg, {loop:.2f} loop ms/msg")


if __name__ == "__main__":
    main()
