#!/usr/bin/env python3
"""Where a running postillon's memory goes: PSS of its process tree, by kind of mapping.

    .venv/bin/python bench/memory_breakdown.py PID [--dump DIR] [--imports]
    .venv/bin/python bench/memory_breakdown.py --port 2530          # the listener's owner

For PID and each of its children (the helper processes): the totals of
``/proc/PID/smaps_rollup`` (PSS, its anonymous and file-backed parts) and the PSS of every
mapping summed by kind: the brk heap, glibc's per-thread malloc arenas, thread stacks,
the rest of the anonymous memory (pymalloc's 1 MiB arenas, large allocations), and the
shared objects grouped by owner (the interpreter, each site-packages distribution, system
libraries). Threads by name.

``--dump DIR``: the directory the server was started with as ``POSTILLON_MEMORY_DUMP``
(``observability/memory_dump.py``): imported modules by top-level package and, when the
server ran under ``PYTHONTRACEMALLOC=1``, the Python allocations by package (tracemalloc).

``--imports``: what importing costs in a fresh interpreter (the server's own executable):
nothing, ``postillon.serve``, and the heavy packages one by one after it (0 = already
imported by the server).

Reads /proc only (run it as root for another user's process). Numbers in MiB.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
ARENA = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: one per-thread arena's reservation
STACK = 8 * 1024 * 1024  # the default thread stack (ulimit -s)
HEAVY = (
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "nacl.signing",
    "dkim",
    "spf",
    "prometheus_client",
    "pydantic",
    "dns.resolver",
    "aiohttp",
    "asyncpg",
    "rich",
    "acme.client",
)


def mib(kb: float) -> str:
    return f"{kb / 1024:6.1f}"


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in children(pid):
        pids += tree(child)
    return pids


def rollup(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def owner(path: str) -> str:
    """A shared object's owner: a site-packages distribution, the interpreter, or the system."""
    if "/site-packages/" in path:
        return "site-packages: " + path.split("/site-packages/")[1].split("/")[0].split(".")[0]
    if "libpython" in path or "/lib-dynload/" in path or re.search(r"/bin/python[\d.]*$", path):
        return "interpreter (libpython, stdlib extensions)"
    if path.startswith("/"):
        return "system: " + os.path.basename(path).split(".so")[0]
    return path


def mappings(pid: int) -> list[tuple[int, int, str, str, int]]:
    """(start, end, perms, name, PSS kB) for each mapping."""
    found: list[tuple[int, int, str, str, int]] = []
    current: list[object] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = MAPPING.match(line)
        if head:
            current = [int(head[1], 16), int(head[2], 16), head[3], head[4].strip(), 0]
            found.append(current)  # type: ignore[arg-type]
        elif line.startswith("Pss:") and current is not None:
            current[4] = int(line.split()[1])
    return [tuple(m) for m in found]  # type: ignore[misc]


def by_kind(pid: int) -> collections.Counter[str]:
    kinds: collections.Counter[str] = collections.Counter()
    maps = mappings(pid)
    for i, (start, end, perms, name, pss) in enumerate(maps):
        if name == "[heap]":
            kind = "anon: brk heap (malloc, main arena)"
        elif name == "[stack]":
            kind = "anon: main thread stack"
        elif name.startswith("["):
            kind = f"other: {name}"
        elif name:
            kind = owner(name)
        else:
            after = maps[i + 1] if i + 1 < len(maps) else None
            before = maps[i - 1] if i else None
            reserved = after is not None and not after[3] and after[2].startswith("---")
            if reserved and start % ARENA == 0 and after is not None and after[1] - start == ARENA:
                kind = "anon: malloc arenas of other threads"
            elif end - start == STACK and before is not None and before[2].startswith("---"):
                kind = "anon: thread stacks"
            elif perms.startswith("---"):
                continue
            else:
                kind = "anon: other (pymalloc arenas, large allocations)"
        kinds[kind] += pss
    return kinds


def threads(pid: int) -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except OSError:
            pass
    return names


def report_process(pid: int) -> int:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    totals = rollup(pid)
    print(f"\n## pid {pid}: {cmdline.strip()[:100]}")
    print(
        f"PSS {mib(totals['Pss'])} MiB = anonymous {mib(totals['Pss_Anon'])} + file-backed "
        f"{mib(totals['Pss_File'])} (RSS {mib(totals['Rss'])})"
    )
    names = threads(pid)
    print(
        f"threads: {sum(names.values())} ("
        + ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items()))
        + ")"
    )
    print("\n| PSS MiB | mapping kind |\n|---:|---|")
    for kind, kb in by_kind(pid).most_common():
        if kb >= 100:
            print(f"| {mib(kb)} | {kind} |")
    return totals["Pss"]


def report_dump(directory: Path, top: int) -> None:
    modules = (directory / "modules.txt").read_text().split()
    packages = collections.Counter(m.split(".")[0] for m in modules)
    print(f"\n## imported modules: {len(modules)}")
    print(", ".join(f"{p} {n}" for p, n in packages.most_common(25)))
    snapshot_path = directory / "tracemalloc.snapshot"
    if not snapshot_path.exists():
        print("(no tracemalloc snapshot: start the server with PYTHONTRACEMALLOC=1)")
        return
    import tracemalloc

    snapshot = tracemalloc.Snapshot.load(str(snapshot_path))
    peak = (directory / "tracemalloc.txt").read_text().split()
    by_package: collections.Counter[str] = collections.Counter()
    for stat in snapshot.statistics("filename"):
        path = stat.traceback[0].filename
        if "<frozen importlib" in path:
            package = "module code (unmarshalled at import)"
        elif "/site-packages/" in path:
            package = path.split("/site-packages/")[1].split("/")[0]
        elif "/src/postillon/" in path or "/postillon/" in path:
            package = "postillon/" + path.split("/postillon/")[-1].split("/")[0]
        elif "/lib/python3" in path:
            package = "stdlib: " + path.split("/lib/python3")[1].split("/", 1)[1].split("/")[0]
        else:
            package = path
        by_package[package] += stat.size
    total = sum(by_package.values())
    print(
        f"\n## Python allocations (tracemalloc): {total / 2**20:.1f} MiB now, peak "
        f"{int(peak[3]) / 2**20:.1f} MiB"
    )
    print("\n| MiB | allocated by |\n|---:|---|")
    for package, size in by_package.most_common(top):
        print(f"| {size / 2**20:6.2f} | {package} |")
    print("\n| KiB | line |\n|---:|---|")
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        print(f"| {stat.size / 1024:7.0f} | {frame.filename}:{frame.lineno} |")


IMPORT_PROBE = """
import importlib, sys
def pss():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1])
print("nothing", pss(), len(sys.modules))
for name in sys.argv[1:]:
    before = pss(); count = len(sys.modules)
    importlib.import_module(name)
    print(name, pss() - before if name != "postillon.serve" else pss(), len(sys.modules) - count)
"""


def report_imports(executable: str) -> None:
    done = subprocess.run(
        [executable, "-c", IMPORT_PROBE, "postillon.serve", *HEAVY],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"\n## import costs ({executable}; after postillon.serve: what it adds)")
    print("\n| PSS MiB | modules | import |\n|---:|---:|---|")
    for line in done.stdout.splitlines():
        name, kb, count = line.split()
        print(f"| {mib(int(kb))} | {count} | {name} |")


def listener_pid(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True
    ).stdout
    pids = [int(p) for p in re.findall(r"pid=(\d+)", out)]
    if not pids:
        raise SystemExit(f"nothing listens on port {port}")
    return min(pids)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("pid", type=int, nargs="?", help="the server's pid")
    ap.add_argument("--port", type=int, help="instead of PID: the server listening on PORT")
    ap.add_argument("--dump", type=Path, help="the server's POSTILLON_MEMORY_DUMP directory")
    ap.add_argument("--imports", action="store_true", help="measure import costs too")
    ap.add_argument("--top", type=int, default=15, help="rows of the tracemalloc tables")
    args = ap.parse_args()
    pid = args.pid or (listener_pid(args.port) if args.port else None)
    if pid is None:
        ap.error("give a PID or --port")
    total = sum(report_process(p) for p in tree(pid))
    print(f"\n**process tree PSS: {total / 1024:.1f} MiB**")
    if args.dump:
        report_dump(args.dump, args.top)
    if args.imports:
        # The command's interpreter as started (a venv's python), not /proc/PID/exe: that
        # is the binary the venv links to, without the venv's site-packages.
        report_imports(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())


if __name__ == "__main__":
    sys.exit(main())
