#!/usr/bin/env python3
"""Large and wide messages: postillon against Postfix, same machine, same run (issue 19, 5).

Reuses ``accept_bench.Bench`` (the peer harness's Postfix instance and smtp-sink, the
generated relay config for postillon, ``run.sh`` with ``smtp-source`` as the load, and
the CPU and PSS accounting), with two workloads of its own:

1. **large**: ``--big-n`` messages of ``--big-size`` octets (10 MiB) in ``--big-conc``
   sessions (mode s1: one message per session), relayed to the sink (``bench.test`` ->
   ``smtp:[127.0.0.1]:SINK_PORT``) by Postfix and by postillon, every default on (fsync
   before the 250). Per target: MB/s end to end (accepted and counted by the sink), CPU
   of the MTA's process tree per MB, and the peak PSS of the tree. Both MTAs get the
   same message size limit (50 MiB: postillon's default; Postfix's default of 10,240,000
   octets would refuse a 10 MiB message).
2. **wide**: one message of ``--wide-size`` octets to ``--wide-rcpts`` recipients spread
   over ``--wide-domains`` domains (``r<i>@d<j>.wide.test``). Each domain is routed to
   its own smtp-sink on 127.0.0.<j+2>:WIDE_PORT (postillon: ``[[transport]]`` routes;
   Postfix: the same in ``transport_maps``), so each MTA opens one destination per
   domain as it would on the Internet. Time from the end of DATA (the 250) until the
   sinks have seen every recipient; the sinks dump each transaction to a file, and the
   recipients are counted from those files.

Every round runs Postfix and postillon once each, in an order that alternates. A table
with the medians (min-max) and the ratios postillon/Postfix is written to summary.md.
Runtime under ``--bench-root``, results under ``--results-dir``/<UTC stamp>; needs root
(Postfix instance) and the Debian package postfix. Wrap it in ``flock /tmp/bench.lock``
on a shared machine.

    .venv/bin/python bench/big_bench.py [--reps 3] [--big-n 50] [--wide-rcpts 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from accept_bench import (  # bench/ is on sys.path as the script's dir
    Bench,
    add_harness_args,
    env_int,
    finish,
    listening,
    med_range,
    median,
    only_postfix_peer,
    prepare,
    run_started,
    say,
    tree_cpu,
)

SMTP_SINK = "/usr/sbin/smtp-sink"
MIB = 1024 * 1024
MESSAGE_SIZE_LIMIT = 52_428_800  # postillon's default [limits] message_size
WIDE_ZONE = "wide.test"
_RCPT_LINE = re.compile(rb"^X-Rcpt-Args: ", re.M)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=env_int("REPS", 3), help="rounds (env REPS, 3)")
    ap.add_argument("--big-n", type=int, default=env_int("BIG_N", 50), help="large messages")
    ap.add_argument(
        "--big-size", type=int, default=env_int("BIG_SIZE", 10 * MIB), help="octets each"
    )
    ap.add_argument("--big-conc", type=int, default=env_int("BIG_CONC", 5), help="sessions")
    ap.add_argument("--wide-rcpts", type=int, default=env_int("WIDE_RCPTS", 1000))
    ap.add_argument("--wide-domains", type=int, default=env_int("WIDE_DOMAINS", 50))
    ap.add_argument("--wide-size", type=int, default=env_int("WIDE_SIZE", 20_000))
    ap.add_argument("--no-big", action="store_true", help="skip the large-message rows")
    ap.add_argument("--no-wide", action="store_true", help="skip the wide-message rows")
    ap.add_argument("--keep", action="store_true", help="leave postfix, sinks, postillon running")
    add_harness_args(
        ap,
        bench_root="/var/tmp/postillon-big-bench",
        results_dir="/tmp/postillon-big-bench",
        port=2540,
    )
    ap.add_argument("--sink-port", type=int, default=env_int("SINK_PORT", 2600))
    ap.add_argument(
        "--wide-port",
        type=int,
        default=0,
        help="port of the per-domain sinks on 127.0.0.2.. (default: --sink-port + 1)",
    )
    ap.add_argument(
        "--dns-port",
        type=int,
        default=2654,
        help="postillon's [dns] nameserver: an unused loopback UDP port",
    )
    a = ap.parse_args()
    if not 1 <= a.wide_domains <= 250:
        ap.error("--wide-domains must be 1..250 (one loopback address each)")
    a.wide_port = a.wide_port or a.sink_port + 1
    # What accept_bench.Bench reads: relay to the sink, no DKIM variants, no py-spy,
    # the harness's loopback and durability checks left to accept_bench.
    a.relay, a.no_dkim, a.profile, a.no_checks, a.no_raw = True, True, False, True, True
    only_postfix_peer(a)
    a.n, a.conc, a.size, a.modes = a.big_n, a.big_conc, a.big_size, ["s1"]
    return a


class BigBench(Bench):
    def __init__(self, a: argparse.Namespace) -> None:
        super().__init__(a)
        self.wide_sinks: list[subprocess.Popen[bytes]] = []
        self.wide_dump = Path(tempfile.mkdtemp(prefix="postillon-wide-"))
        self.big: list[dict[str, Any]] = []
        self.wide: list[dict[str, Any]] = []

    def domains(self) -> list[tuple[str, str]]:
        """(domain, sink address) for the wide message."""
        return [(f"d{j}.{WIDE_ZONE}", f"127.0.0.{j + 2}") for j in range(self.a.wide_domains)]

    # -------------------------------------------------------------- set-up
    def postillon_config(self, name: str = "postillon", port: int | None = None) -> Path:
        cfg = super().postillon_config(name, port)
        routes = "".join(
            f'\n[[transport]]\ndomain = "{domain}"\nroute = "smtp:[{ip}]:{self.a.wide_port}"\n'
            for domain, ip in self.domains()
        )
        with open(cfg, "a") as f:
            f.write(routes)
        shutil.copy(cfg, self.out / f"{name}.toml")
        return cfg

    def start(self) -> None:
        a = self.a
        if not a.no_wide:
            if listening(a.wide_port):
                raise SystemExit(f"port {a.wide_port} is busy: pick --wide-port")
            self.start_wide_sinks()
        super().start()
        # The same size limit and routes for Postfix, then a reload.
        etc = str(self.root / "postfix" / "etc")
        routes = ", ".join(f"{d}=smtp:[{ip}]:{a.wide_port}" for d, ip in self.domains())
        sink = f"bench.test=smtp:[127.0.0.1]:{a.sink_port}"
        relay = ", ".join(["bench.test", *(d for d, _ in self.domains())])
        self.sh(
            "postconf",
            "-c",
            etc,
            "-e",
            f"message_size_limit = {MESSAGE_SIZE_LIMIT}",
            f"transport_maps = inline:{{ {sink}, {routes} }}",
            f"relay_domains = {relay}",
        )
        self.sh("postfix", "-c", etc, "reload")
        time.sleep(1)

    def start_wide_sinks(self) -> None:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.wide_dump.chmod(0o777)
        for domain, ip in self.domains():
            dump = self.wide_dump / domain
            dump.mkdir()
            dump.chmod(0o777)
            proc = subprocess.Popen(
                [SMTP_SINK, *user, "-d", f"{dump}/%M.", f"{ip}:{self.a.wide_port}", "64"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.wide_sinks.append(proc)
        deadline = time.monotonic() + 10
        while not listening(self.a.wide_port):
            if time.monotonic() > deadline:
                raise SystemExit("the per-domain smtp-sinks did not start")
            time.sleep(0.05)

    # -------------------------------------------------------------- measuring
    def large(self, name: str, port: int) -> None:
        a = self.a
        r = self.one(name, port, "s1", a.big_n, out="big.jsonl")
        if r is None:
            return
        megabytes = a.big_n * a.big_size / MIB
        row = {
            "target": name,
            "mb_s": round(megabytes / r["e2e_s"], 1) if r.get("e2e_s") else None,
            "accept_mb_s": round(r["accept_mps"] * a.big_size / MIB, 1)
            if r.get("accept_mps")
            else None,
            "cpu_ms_per_mb": round(r["cpu_ms_per_msg"] * a.big_n / megabytes, 2)
            if r.get("cpu_ms_per_msg") is not None
            else None,
            "pss_mib": round(r["peak_pss_kb"] / 1024, 1) if r.get("peak_pss_kb") else None,
        }
        self.big.append(row)
        say(f"   {name}: {row}")

    def wide_recipients(self) -> int:
        count = 0
        for path in self.wide_dump.rglob("*"):
            if path.is_file():
                try:
                    count += len(_RCPT_LINE.findall(path.read_bytes()[:200_000]))
                except OSError:
                    pass
        return count

    def clear_wide(self) -> None:
        for path in self.wide_dump.rglob("*"):
            if path.is_file():
                path.unlink(missing_ok=True)

    def wide_once(self, name: str, port: int) -> None:
        a = self.a
        self.clear_wide()
        domains = self.domains()
        rcpts = [f"r{i}@{domains[i % len(domains)][0]}" for i in range(a.wide_rcpts)]
        body = (
            b"From: wide@bench.test\r\nTo: undisclosed-recipients:;\r\nSubject: wide\r\n\r\n"
            + b"wide message body line\r\n" * (a.wide_size // 24)
        )
        root = self.roots()[name]
        cpu0 = tree_cpu(root)
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            s.ehlo("client.bench.local")
            s.mail("wide@bench.test")
            for rcpt in rcpts:
                code, reply = s.rcpt(rcpt)
                if code != 250:
                    raise SystemExit(f"{name} refused {rcpt}: {code} {reply!r}")
            code, reply = s.data(body)
            if code != 250:
                raise SystemExit(f"{name} refused the wide message: {code} {reply!r}")
            accepted = time.monotonic()
        deadline = accepted + 300
        seen = 0
        while seen < a.wide_rcpts:
            if time.monotonic() > deadline:
                self.problems.append(f"{name}: {seen} of {a.wide_rcpts} recipients in 300 s")
                return
            time.sleep(0.02)
            seen = self.wide_recipients()
        done = time.monotonic() - accepted
        connections = sum(1 for p in self.wide_dump.rglob("*") if p.is_file())
        row = {
            "target": name,
            "seconds": round(done, 3),
            "transactions": connections,
            "cpu_s": round(tree_cpu(root) - cpu0, 3),
        }
        self.wide.append(row)
        say(f"   {name}: {row}")
        time.sleep(1)  # let the MTA settle (outcomes recorded) before the next run

    def rounds(self) -> None:
        a = self.a
        targets = [("postfix", a.postfix_port), ("postillon", a.port)]
        for rep in range(a.reps):
            order = targets if rep % 2 == 0 else targets[::-1]
            if not a.no_big:
                say(f"== round {rep + 1}/{a.reps}: {a.big_n} x {a.big_size} octets")
                for name, port in order:
                    self.large(name, port)
            if not a.no_wide:
                say(
                    f"== round {rep + 1}/{a.reps}: one message to {a.wide_rcpts} recipients"
                    f" in {a.wide_domains} domains"
                )
                for name, port in order:
                    self.wide_once(name, port)

    # -------------------------------------------------------------- teardown
    def stop(self) -> None:
        super().stop()
        if self.a.keep:
            if self.wide_sinks:
                pids = " ".join(str(p.pid) for p in self.wide_sinks)
                say(f"--keep: per-domain smtp-sinks left running: kill {pids}")
            return
        for proc in self.wide_sinks:
            proc.kill()
            proc.wait()
        shutil.rmtree(self.wide_dump, ignore_errors=True)

    # -------------------------------------------------------------- report
    def summary(self) -> str:
        a = self.a

        def col(rows: list[dict[str, Any]], name: str, key: str, fmt: str) -> str:
            return med_range([r[key] for r in rows if r["target"] == name], fmt)

        def ratio(rows: list[dict[str, Any]], key: str, inverse: bool = False) -> str:
            p = median([r[key] for r in rows if r["target"] == "postillon"])
            f = median([r[key] for r in rows if r["target"] == "postfix"])
            if not p or not f:
                return "-"
            return f"{(f / p) if inverse else (p / f):.2f}x"

        lines = [
            "# Large and wide messages: postillon vs Postfix (bench/big_bench.py)",
            "",
            *(f"- {k}: {v}" for k, v in self.info.items()),
            "",
        ]
        if self.big:
            lines += [
                f"## {a.big_n} messages of {a.big_size / MIB:.1f} MiB, {a.big_conc} sessions,"
                " relayed to smtp-sink",
                "",
                "| target | e2e MB/s | accepted MB/s | CPU ms per MB | peak PSS MiB |",
                "|---|---|---|---|---|",
            ]
            for name in ("postfix", "postillon"):
                lines.append(
                    f"| {name} | {col(self.big, name, 'mb_s', '%.1f')} "
                    f"| {col(self.big, name, 'accept_mb_s', '%.1f')} "
                    f"| {col(self.big, name, 'cpu_ms_per_mb', '%.2f')} "
                    f"| {col(self.big, name, 'pss_mib', '%.1f')} |"
                )
            lines += [
                f"| postillon/Postfix | {ratio(self.big, 'mb_s')} "
                f"| {ratio(self.big, 'accept_mb_s')} | {ratio(self.big, 'cpu_ms_per_mb')} "
                f"| {ratio(self.big, 'pss_mib')} |",
                "",
            ]
        if self.wide:
            lines += [
                f"## One message ({a.wide_size} octets) to {a.wide_rcpts} recipients in"
                f" {a.wide_domains} domains, one smtp-sink per domain",
                "",
                "| target | seconds from 250 to all delivered | transactions | CPU s |",
                "|---|---|---|---|",
            ]
            for name in ("postfix", "postillon"):
                lines.append(
                    f"| {name} | {col(self.wide, name, 'seconds', '%.2f')} "
                    f"| {col(self.wide, name, 'transactions', '%.0f')} "
                    f"| {col(self.wide, name, 'cpu_s', '%.2f')} |"
                )
            lines += [
                f"| Postfix/postillon (speed-up) | {ratio(self.wide, 'seconds', inverse=True)} "
                f"| | {ratio(self.wide, 'cpu_s', inverse=True)} |",
                "",
            ]
        if self.problems:
            lines += ["## Problems", "", *(f"- {p}" for p in self.problems), ""]
        return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    b = BigBench(a)
    t0 = prepare(b)
    b.info["settings"] = (
        f"REPS={a.reps} BIG_N={a.big_n} BIG_SIZE={a.big_size} BIG_CONC={a.big_conc} "
        f"WIDE_RCPTS={a.wide_rcpts} WIDE_DOMAINS={a.wide_domains} WIDE_SIZE={a.wide_size}"
    )
    run_started(b, b.rounds)
    finish(b, t0, b.summary)


if __name__ == "__main__":
    main()
