#!/usr/bin/env python3
"""CPU per message of the inbound authentication checks alone, in-process.

``verify_bench.py`` measures what users see (msg/s over SMTP, checks on against off);
this one isolates the cost of :meth:`InboundAuthentication.evaluate` for the same message
(signed with RSA-2048 and Ed25519, SPF and DMARC p=reject), with the real resolver asking
a DNS server on loopback (its cache warm after the first message), so each change to the
checks can be measured in seconds::

    .venv/bin/python bench/auth_micro.py [--n 3000] [--profile] [--processes 1]

It prints CPU microseconds per message in this process (the event loop and any worker
threads; with ``--processes`` the helper processes' share is not in it: that is the
point), and with ``--profile`` the top functions by own time (cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verify_bench import SENDER_DOMAIN, make_keys, signed_message

from postillon.checks.authentication import InboundAuthentication, MessageFacts
from postillon.config.model import AuthenticationConfig
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.helpers.pool import HelperPool
from postillon.testing.dns_server import DnsServer


async def run(
    n: int, profile: bool, nameserver: str, message: bytes, sort: str, processes: int
) -> None:
    resolver = DnsResolver([nameserver], timeout=2.0, attempts=1)
    pool = HelperPool(processes) if processes else None
    if pool is not None:
        await pool.start()
    checks = InboundAuthentication(
        AuthenticationConfig(enabled=True), resolver, "postillon.bench.local", helpers=pool
    )
    header = message[: message.index(b"\r\n\r\n") + 2]
    facts = MessageFacts(
        client_ip="127.0.0.1",
        helo="localhost",
        mail_from=f"bench@{SENDER_DOMAIN}",
        header=header,
        message=message,
        recipients=[("sink@bench.test", "sink@bench.test")],
    )
    first = await checks.evaluate(facts)
    print("verdict:", first.summary())
    assert first.decision.action == "accept", first.decision
    for _ in range(200):  # warm caches and code paths
        await checks.evaluate(facts)
    profiler = cProfile.Profile() if profile else None
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for _ in range(n):
        await checks.evaluate(facts)
    if profiler is not None:
        profiler.disable()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    print(
        f"{n} messages: {cpu / n * 1e6:.0f} µs CPU in this process, "
        f"{wall / n * 1e6:.0f} µs wall per message (one at a time)"
    )
    if pool is not None:
        await pool.close()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(sort).print_stats(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--processes", type=int, default=0, help="helper processes verifying DKIM (0: inline)"
    )
    ap.add_argument("--sort", default="tottime", help="cProfile order: tottime, cumulative")
    args = ap.parse_args()
    rsa_pem, ed_seed, zone = make_keys()
    message = signed_message(args.size, rsa_pem, ed_seed).replace(b"\n", b"\r\n")
    with DnsServer({SENDER_DOMAIN: zone}) as dns:
        asyncio.run(run(args.n, args.profile, dns.nameserver, message, args.sort, args.processes))


if __name__ == "__main__":
    main()
