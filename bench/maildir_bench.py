#!/usr/bin/env python3
"""Local delivery while accepting: postillon against Postfix, both delivering to Maildir.

Issue 19, target 2: with every message delivered to a Maildir, postillon's acceptance
(and its end-to-end rate: messages complete in the Maildir's ``new/``) should be at
least 1.5x Postfix delivering to its own Maildir, same machine, same run, default
settings (fsync before the 250, every check on). ``make bench`` runs it after
``accept_bench.py``. It reuses ``accept_bench.Bench`` (Postfix through the peer
harness's ``configure.sh``/``start.sh``/``stop.sh``, postillon's launch, CPU and
profile helpers) and the harness's ``run.py`` (the load: ``run_load``, the PSS
sampler ``RssSampler``):

1. **Postfix** on 127.0.0.1:POSTFIX_PORT: the harness's Postfix peer, then
   ``postconf -e`` makes ``bench.test`` a virtual mailbox domain delivered by
   ``virtual(8)`` into a Maildir: ``virtual_mailbox_maps = inline:{@bench.test=
   bench.test/rcpt/}`` (a catch-all; the trailing slash means Maildir),
   ``virtual_mailbox_base = BENCH_ROOT/postfix/mail``, owned by the ``postillon``
   user (``virtual_uid_maps``/``virtual_gid_maps``; ``nobody`` if that user is
   missing). Relaying is off (``relay_domains`` and ``transport_maps`` empty).
2. **postillon** on 127.0.0.1:PORT: ``[[domain]] name = "bench.test"``,
   ``mailboxes = ["rcpt"]``, ``catch_all = "rcpt"``: the domain is local, its
   route is ``maildir`` (``data_dir/mail/bench.test/rcpt/``). Everything else as
   in ``accept_bench.py`` (127.0.0.0/8 is a trusted network, fsync before the 250,
   a fresh queue).
3. The load is the harness's: ``smtp-source -N -t rcpt@bench.test`` (distinct
   recipients ``<n>rcpt@bench.test``), 4 KiB, 20 sessions, modes s5 (5 messages
   per session) and s1 (1 per session). Both MTAs deliver every one of them to the
   one catch-all Maildir, so both pay the same: one mailbox, N files.
4. Per run: **accepted msg/s** = N / wall time of the load; **delivered msg/s** =
   N / time from the start of the load until ``new/`` holds N more files (polled
   every 20 ms); CPU ms/msg of the MTA's process tree (reaped children included)
   over that whole window, so delivery is in it; peak PSS of the tree. After each
   run the script waits until ``new/`` is still, checks that no file is missing or
   extra and every one is complete (ends with the body's last line), then empties
   ``new/`` so that every run starts alike.
5. ``--durability`` style check (default on; ``--no-checks`` skips it): fsync-family
   syscalls per message over 200 messages, counted with ``strace -f -c`` until all
   200 are in ``new/``, for both.
6. ``REPS`` rounds, interleaved (the order of the two rotates per round), after a
   warm-up; a table with the medians and the ratio postillon/Postfix per mode, in
   ``RESULTS_DIR/<UTC stamp>-maildir/summary.md``. ``--profile`` adds one py-spy
   run per mode (``py-spy record --gil``) and its hot-spot table.

Needs root (Postfix's instance, strace). Nothing is written into the git tree.

    .venv/bin/python bench/maildir_bench.py [--reps 3] [--n 2000] [--profile]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from accept_bench import (  # bench/ is on sys.path as the script's dir
    DASH,
    MODE_TXT,
    Bench,
    add_harness_args,
    env_int,
    finish,
    machine_cpu,
    measure_rounds,
    med_range,
    median,
    only_postfix_peer,
    prepare,
    run_started,
    say,
    thread_cpu,
    tree_cpu,
)

MAILBOX = "rcpt"  # the catch-all local part both MTAs deliver every message to
POLL = 0.02  # seconds between counts of new/


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=env_int("REPS", 3), help="rounds (env REPS, 3)")
    ap.add_argument("--n", type=int, default=env_int("N", 2000), help="messages per run (env N)")
    ap.add_argument("--conc", type=int, default=env_int("CONC", 20), help="sessions (env CONC)")
    ap.add_argument("--size", type=int, default=env_int("SIZE", 4096), help="body bytes (env SIZE)")
    ap.add_argument("--modes", default=os.environ.get("MODES", "s5 s1"), help='"s5 s1"')
    ap.add_argument(
        "--profile", action="store_true", help="one more postillon run per mode under py-spy"
    )
    ap.add_argument("--no-checks", action="store_true", help="skip the fsync count (strace)")
    ap.add_argument("--keep", action="store_true", help="leave postfix and postillon running")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="A/B: also run the postillon whose sources are in this src/ directory (e.g. a "
        "worktree at main) as 'postillon-base' on --port + 4, interleaved with the others",
    )
    ap.add_argument(
        "--only-postillon",
        action="store_true",
        help="skip the Postfix runs (for A/B iterations on postillon alone; no ratio)",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for delivery")
    add_harness_args(
        ap,
        bench_root="/var/tmp/postillon-maildir-bench",
        results_dir="/tmp/postillon-bench",
        port=2530,
        results_help="results go to RESULTS_DIR/<UTC stamp>-maildir/",
    )
    ap.add_argument("--sink-port", type=int, default=env_int("SINK_PORT", 2600), help="unused")
    ap.add_argument("--dns-port", type=int, default=2653, help="postillon's unused DNS port")
    a = ap.parse_args()
    a.modes = [m for m in re.split(r"[,\s]+", a.modes) if m]
    if a.n % (5 * a.conc) and "s5" in a.modes:
        ap.error("N must be a multiple of 5*CONC for mode s5")
    # what accept_bench.Bench reads and this bench does not offer
    a.relay, a.no_dkim, a.no_raw = False, True, True
    only_postfix_peer(a)
    return a


def process_cpu(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, all its threads."""
    if pid is None:
        return 0.0, 0.0
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    f = s[s.rindex(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tck, int(f[12]) / tck


def count_files(directory: Path) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


class MaildirBench(Bench):
    def __init__(self, a: argparse.Namespace) -> None:
        super().__init__(a)
        self.stamp += "-maildir"
        self.out = (a.results_dir / self.stamp).resolve()
        self.env["ACCEPT_ONLY"] = "postillon postfix"
        try:
            user = pwd.getpwnam("postillon")
        except KeyError:
            user = pwd.getpwnam("nobody")
        self.mail_uid, self.mail_gid = user.pw_uid, user.pw_gid
        self.harness_mod: ModuleType | None = None

    # -------------------------------------------------------------- set-up
    def run_py(self) -> ModuleType:
        """The peer harness's run.py as a module (its load generator and PSS sampler)."""
        if self.harness_mod is None:
            os.environ["BENCH_ROOT"] = str(self.root)
            os.environ["SINK_PORT"] = str(self.a.sink_port)
            sys.path.insert(0, str(self.peers))
            self.harness_mod = importlib.import_module("run")
        return self.harness_mod

    def new_dir(self, name: str) -> Path:
        if name == "postfix":
            return self.root / "postfix" / "mail" / "bench.test" / MAILBOX / "new"
        return self.root / name / "data" / "mail" / "bench.test" / MAILBOX / "new"

    def targets(self) -> list[tuple[str, int]]:
        a = self.a
        found = [("postfix", a.postfix_port), ("postillon", a.port)]
        if a.only_postillon:
            found = found[1:]
        if a.baseline:
            found.append(("postillon-base", a.port + 4))
        return found

    def postillon_config(self, name: str = "postillon", port: int | None = None) -> Path:
        a = self.a
        pdir = self.root / name
        data = pdir / "data"
        if data.exists():
            shutil.rmtree(data)  # a fresh queue and Maildir each run
        pdir.mkdir(parents=True, exist_ok=True)
        user = "postillon" if self.mail_uid == pwd.getpwnam("postillon").pw_uid else ""
        text = f"""\
# Generated by bench/maildir_bench.py for one benchmark run.
hostname = "postillon.bench.local"
data_dir = "{data}"
user = "{user}"

[[listen]]
kind = "smtp"
address = "127.0.0.1:{a.port if port is None else port}"

[tls]
self_signed = false            # no STARTTLS offered (the Postfix peer has TLS off too)

[relay]
trusted_networks = ["127.0.0.0/8"]

[limits]
connections_per_ip = 200       # all load comes from 127.0.0.1

[log]
file = "{self.out / f"{name}.log"}"

[dns]
nameservers = ["127.0.0.1:{a.dns_port}"]   # unused loopback port: nothing leaves the machine
timeout = 1.0
attempts = 1

[[domain]]
name = "bench.test"            # local: routed to maildir, data_dir/mail/bench.test/{MAILBOX}/
mailboxes = ["{MAILBOX}"]
catch_all = "{MAILBOX}"        # smtp-source -N sends to <n>{MAILBOX}@bench.test
"""
        cfg = pdir / "postillon.toml"
        cfg.write_text(text)
        shutil.copy(cfg, self.out / f"{name}.toml")
        return cfg

    def configure_postfix(self) -> None:
        self.sh("./configure.sh", "postfix")
        etc = self.root / "postfix" / "etc"
        base = self.root / "postfix" / "mail"
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        os.chown(base, self.mail_uid, self.mail_gid)
        settings = {
            "relay_domains": "",
            "transport_maps": "",
            "virtual_mailbox_domains": "bench.test",
            "virtual_mailbox_base": str(base),
            "virtual_mailbox_maps": f"inline:{{ @bench.test=bench.test/{MAILBOX}/ }}",
            "virtual_uid_maps": f"static:{self.mail_uid}",
            "virtual_gid_maps": f"static:{self.mail_gid}",
        }
        subprocess.run(
            ["postconf", "-c", str(etc), "-e", *(f"{k}={v}" for k, v in settings.items())],
            check=True,
        )
        (self.out / "postfix-maildir.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items())
        )

    def start(self) -> None:
        a = self.a
        say(f"== Postfix on 127.0.0.1:{a.postfix_port}, virtual(8) to Maildir")
        self.configure_postfix()
        self.sh("./start.sh", "postfix")
        self.started.append("postfix")
        self.postillon = self.launch("postillon", a.port, ())
        if a.baseline:
            os.environ["PYTHONPATH"] = str(a.baseline.resolve())  # before the venv's src
            try:
                base = self.launch("postillon-base", a.port + 4, ())
            finally:
                del os.environ["PYTHONPATH"]
            self.signed["postillon-base"] = (base, a.port + 4)  # stop() stops it
        for name, port in self.targets():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.sendmail(
                        "smoke@bench.test", ["smoke@bench.test"], b"Subject: smoke\r\n\r\nx\r\n"
                    )
            except (smtplib.SMTPException, OSError) as exc:
                raise SystemExit(f"{name} on port {port} refused a test message: {exc}") from exc
            if not self.wait_count(self.new_dir(name), 1, 30):
                log = self.root / "postfix" / "maillog" if name == "postfix" else None
                raise SystemExit(
                    f"{name}: the test message did not reach {self.new_dir(name)} in 30 s\n"
                    + self.tail(log or self.out / "postillon.log")
                )
            self.empty(name)

    @staticmethod
    def wait_count(directory: Path, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while count_files(directory) < want:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def empty(self, name: str) -> None:
        """Move new/'s files aside (rename: deleting them would leave thousands of
        recently freed inodes, which ext4 without a journal scans past on every file
        creation of the next run); they are deleted when the bench stops."""
        directory = self.new_dir(name)
        aside = directory.parent.parent.parent / "delivered"
        aside.mkdir(exist_ok=True)
        for entry in os.listdir(directory):
            os.rename(directory / entry, aside / f"{name}.{entry}")

    def stop(self) -> None:
        super().stop()
        if not self.a.keep:
            for name, _ in self.targets():
                shutil.rmtree(self.new_dir(name).parent.parent.parent / "delivered", True)

    def settle(self, name: str, quiet: float = 0.5, limit: float = 30.0) -> int:
        """Wait until new/ has not changed for ``quiet`` seconds; its count."""
        directory = self.new_dir(name)
        end = time.monotonic() + limit
        last, since = count_files(directory), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.1)
            c = count_files(directory)
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def verify(self, name: str) -> int:
        """Files in new/ whose body (after the header section) is shorter or longer than the
        most common body length: smtp-source sends the same body in every message."""
        directory = self.new_dir(name)
        lengths: Counter[int] = Counter()
        for entry in os.listdir(directory):
            data = (directory / entry).read_bytes()
            lengths[len(data) - data.find(b"\n\n")] += 1
        if not lengths:
            return 0
        return sum(lengths.values()) - lengths.most_common(1)[0][1]

    # -------------------------------------------------------------- measuring
    def one(self, name: str, port: int, mode: str, n: int, out: str) -> dict[str, Any] | None:
        if name == "postillon" and not self.alive():
            raise SystemExit("postillon died:\n" + self.tail(self.out / "postillon.stderr"))
        h = self.run_py()
        directory = self.new_dir(name)
        self.empty(name)
        root = self.roots()[name]
        loop_pid = root if name.startswith("postillon") else None
        sampler = h.RssSampler(root)
        sampler.start()
        result: list[tuple[bool, list[str]]] = []
        tag = f"{name}-{mode}-{int(time.time() * 1000)}"
        load = threading.Thread(
            target=lambda: result.append(h.run_load(mode, port, n, self.a.conc, self.a.size, tag))
        )
        cpu0, box0, main0 = tree_cpu(root), machine_cpu(), thread_cpu(loop_pid)
        proc0 = process_cpu(loop_pid)
        lo0 = h.listen_overflows()
        t0 = time.monotonic()
        load.start()
        t_acc = e2e = None
        deadline = t0 + self.a.timeout
        while t_acc is None or e2e is None:
            time.sleep(POLL)
            now = time.monotonic()
            if t_acc is None and not load.is_alive():
                t_acc = now - t0
            if e2e is None and count_files(directory) >= n:
                e2e = now - t0
            if now > deadline and t_acc is not None:
                break
        cpu1, box1, main1 = tree_cpu(root), machine_cpu(), thread_cpu(loop_pid)
        proc1 = process_cpu(loop_pid)
        lo1 = h.listen_overflows()
        sampler.stop()
        load.join()
        ok, errs = result[0]
        delivered = self.settle(name)
        incomplete = self.verify(name)
        r: dict[str, Any] = {
            "peer": name,
            "mode": mode,
            "n": n,
            "accept_mps": round(n / t_acc, 1),
            "e2e_mps": round(n / e2e, 1) if e2e else None,
            "e2e_timeout_s": None if e2e else self.a.timeout,
            "delivered": delivered,
            "incomplete": incomplete,
            "load_errors": len(errs),
            "first_error": errs[0][:300] if errs else None,
            "load_ok": ok,
            "peak_pss_kb": sampler.peak_pss or None,
            "peak_procs": sampler.peak_procs or None,
            "listen_overflows": lo1 - lo0 if lo0 is not None and lo1 is not None else None,
            "cpu_ms_per_msg": round((cpu1 - cpu0) * 1000 / n, 3) if root else None,
            "machine_ms_per_msg": round((box1 - box0) * 1000 / n, 3),
        }
        if loop_pid:
            r["loop_ms_per_msg"] = round((sum(main1) - sum(main0)) * 1000 / n, 3)
            r["sys_ms_per_msg"] = round((proc1[1] - proc0[1]) * 1000 / n, 3)
        with open(self.out / out, "a") as f:
            f.write(json.dumps(r) + "\n")
        if delivered != n or incomplete:
            self.problems.append(
                f"{name} {mode}: {delivered} files in new/ for {n} messages, "
                f"{incomplete} incomplete"
            )
        self.empty(name)
        return r

    def durability(self, name: str, port: int, n: int = 200) -> dict[str, Any]:
        """fsync-family syscalls per message, until all ``n`` are in new/."""
        h = self.run_py()
        self.empty(name)
        root = self.roots()[name]
        log = self.out / f"strace-{name}.txt"
        cmd = ["strace", "-f", "-c", "-o", str(log), "-e", "trace=" + h.SYNC_CALLS]
        for pid in h.tree(root, h.proc_table()):
            cmd += ["-p", str(pid)]
        st = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # let strace attach everywhere
        h.run_load("s1", port, n, 10, self.a.size, "dur")
        self.wait_count(self.new_dir(name), n, 60)
        time.sleep(1.0)
        st.send_signal(signal.SIGINT)
        st.wait()
        counts: dict[str, int] = {}
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in h.SYNC_CALLS.split(","):
                counts[parts[-1]] = int(parts[3])
        self.empty(name)
        return {"peer": name, "sync_calls": counts, "per_msg": round(sum(counts.values()) / n, 2)}

    def checks(self) -> None:
        say("== fsync-family syscalls per message (strace -f -c, 200 messages until in new/)")
        self.dur = []
        for name, port in self.targets():
            r = self.durability(name, port)
            self.dur.append(r)
            say(f"   {name}: {r['sync_calls']} = {r['per_msg']} per message")

    def throughput(self) -> None:
        a = self.a
        targets = self.targets()
        say("== warm-up (not counted)")
        for name, port in targets:
            self.one(name, port, a.modes[0], 5 * a.conc, "warmup.jsonl")
        say(
            f"== {a.reps} rounds x {len(a.modes)} modes x {len(targets)} targets, "
            f"N={a.n} CONC={a.conc}"
        )
        for rep in range(a.reps):
            for mode in a.modes:
                for i in range(len(targets)):
                    name, port = targets[(i + rep) % len(targets)]
                    r = self.one(name, port, mode, a.n, "runs.jsonl")
                    assert r is not None
                    r["rep"] = rep + 1
                    self.runs.append(r)
                    say(
                        f"   rep {rep + 1} {mode} {name:9s} {r['accept_mps']:6.0f} accepted, "
                        f"{r['e2e_mps'] or 0:6.0f} delivered msg/s, "
                        f"{r['cpu_ms_per_msg']:.2f} CPU ms/msg, "
                        f"PSS {(r['peak_pss_kb'] or 0) / 1024:.0f} MiB"
                        + (
                            f", loop {r['loop_ms_per_msg']:.2f}, sys {r['sys_ms_per_msg']:.2f}"
                            if "loop_ms_per_msg" in r
                            else ""
                        )
                        + (f", {r['load_errors']} LOAD ERRORS" if r["load_errors"] else "")
                    )

    # -------------------------------------------------------------- report
    def ratio_table(self, ours: str, theirs: str, label: str, target: float | None) -> list[str]:
        L = [
            f"| mode | accepted msg/s {ours} | {label} | ratio | delivered msg/s {ours} "
            f"| {label} | ratio | CPU ms/msg {ours} / {label} | peak PSS MiB {ours} / "
            f"{label} |" + (f" target (>= {target}x) |" if target else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if target else ""),
        ]
        for mode in self.a.modes:
            p = [r for r in self.runs if r["peer"] == ours and r["mode"] == mode]
            f = [r for r in self.runs if r["peer"] == theirs and r["mode"] == mode]
            if not p or not f:
                continue
            pa, fa = (median([r["accept_mps"] for r in x]) or 0 for x in (p, f))
            pe, fe = (median([r["e2e_mps"] for r in x]) or 0 for x in (p, f))
            pc, fc = (median([r["cpu_ms_per_msg"] for r in x]) or 0 for x in (p, f))
            pp, fp = (max(r["peak_pss_kb"] or 0 for r in x) / 1024 for x in (p, f))
            ra, re_ = pa / fa, (pe / fe if fe else 0)
            met = ("yes |" if min(ra, re_) >= target else "**no** |") if target else ""
            L.append(
                f"| {MODE_TXT.get(mode, mode)} | {med_range([r['accept_mps'] for r in p])} | "
                f"{med_range([r['accept_mps'] for r in f])} | **{ra:.2f}** | "
                f"{med_range([r['e2e_mps'] for r in p])} | "
                f"{med_range([r['e2e_mps'] for r in f])} | **{re_:.2f}** | "
                f"{pc:.2f} / {fc:.2f} | {pp:.0f} / {fp:.0f} | {met}"
            )
        return [*L, ""]

    def report(self, hot: list[str]) -> str:
        a = self.a
        L = [f"# Maildir delivery while accepting: postillon vs Postfix ({self.stamp})", ""]
        L += [f"- {k}: {v}" for k, v in self.info.items()]
        L += [f"- results: {self.out}", ""]
        L += self.ratio_table("postillon", "postfix", "Postfix", target=1.5)
        if a.baseline:
            L += ["A/B against the baseline postillon (`--baseline`):", ""]
            L += self.ratio_table("postillon", "postillon-base", "baseline", target=None)
        L += [
            "| target | mode | accepted msg/s | delivered msg/s | CPU ms/msg | of it system | "
            "loop thread ms/msg | peak PSS MiB (procs) | load errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, _ in self.targets():
            for mode in a.modes:
                rs = [r for r in self.runs if r["peer"] == name and r["mode"] == mode]
                if not rs:
                    continue
                pss = max(r["peak_pss_kb"] or 0 for r in rs) / 1024
                L.append(
                    f"| {name} | {MODE_TXT.get(mode, mode)} | "
                    f"{med_range([r['accept_mps'] for r in rs])} | "
                    f"{med_range([r['e2e_mps'] for r in rs])} | "
                    f"{med_range([r['cpu_ms_per_msg'] for r in rs], '%.2f')} | "
                    f"{med_range([r.get('sys_ms_per_msg') for r in rs], '%.2f')} | "
                    f"{med_range([r.get('loop_ms_per_msg') for r in rs], '%.2f')} | "
                    f"{pss:.0f} ({max(r['peak_procs'] or 0 for r in rs)}) | "
                    f"{sum(r['load_errors'] for r in rs)} |"
                )
        L += [
            "",
            f"Median of {a.reps} interleaved rounds (min{DASH}max). Delivered = N / time until "
            "N files are in the Maildir's new/. CPU = the MTA's process tree (reaped "
            "children included) from the start of the load until the last delivery, / N.",
            "",
        ]
        if getattr(self, "dur", None):
            L += ["| peer | fsync-family calls (200 msgs, until delivered) | per message |"]
            L += ["|---|---|---|"]
            L += [
                f"| {r['peer']} | {json.dumps(r['sync_calls'])} | {r['per_msg']:.2f} |"
                for r in self.dur
            ]
            L.append("")
        L += hot
        if self.problems:
            L += ["## Problems", ""] + [f"- {p}" for p in self.problems] + [""]
        return "\n".join(L) + "\n"


def main() -> None:
    a = parse_args()
    b = MaildirBench(a)
    t0 = prepare(b)
    hot = run_started(b, lambda: measure_rounds(b))
    finish(b, t0, lambda: b.report(hot))


if __name__ == "__main__":
    main()
