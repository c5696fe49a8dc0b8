"""The real ``postillon serve`` holds only what its config uses (issue 19, target 3: peak
memory). Most of an idle server's memory is its imported modules (bench/README.md,
"Memory"): these tests read the module list the server writes when started with
``POSTILLON_MEMORY_DUMP`` (observability/memory_dump.py), and its helper process's
mappings, so an eager import of a heavy package fails here instead of showing up as a few
MiB more in the next benchmark. No timing is asserted."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from pathlib import Path

from conftest import MakeServer
from sink_fixtures import Sink
from support.ports import free_port

# What a server with the default SQLite store, no admin page, no MTA-STS server, no TLS
# reports and no ACME never needs: the packages and postillon's other commands.
NEVER_WITH_DEFAULTS = (
    "aiohttp",  # admin page, MTA-STS server, TLS report POSTs
    "asyncpg",  # [queue] store = "postgresql"
    "acme",  # [tls] acme
    "josepy",
    "rich",  # the CLI's tables
    "postillon.admin",
    "postillon.cli.queue_cmd",
    "postillon.cli.db_cmd",
    "postillon.postfiximport",
    "postillon.provision",
    "postillon.queue.postgres_store",
)
# Shared objects an idle helper process has not loaded (cryptography, libsodium).
HELPER_HANDLER_LIBRARIES = ("_rust.abi3.so", "_sodium")


def server_modules(dump: Path, timeout: float = 20.0) -> list[str]:
    path = dump / "modules.txt"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the server wrote no POSTILLON_MEMORY_DUMP"
        time.sleep(0.1)
    return path.read_text().split()


def thread_arenas(pid: int) -> int:
    """glibc malloc arenas besides the main one: 64 MiB reservations, 64 MiB aligned."""
    starts = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) == 5 and fields[1] == "rw-p" and start % ARENA == 0:
            starts.append((start, end))
    return len(starts)


ARENA = 64 * 1024 * 1024


def pss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1])
    raise AssertionError("no Pss_Anon")


def test_an_mx_with_default_settings_imports_no_unused_package(
    make_server: MakeServer, tmp_path: Path
) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    server = make_server(
        authentication={"enabled": True},  # the default; the test config turns it off
        helper_processes=1,
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "relay.test", "route": "smtp:[127.0.0.1]:9"}],
    )
    server.env["POSTILLON_MEMORY_DUMP"] = str(dump)
    server.start()
    modules = server_modules(dump)
    assert "postillon.checks.authentication" in modules  # the dump is the server's
    loaded = [m for m in modules if m.startswith(NEVER_WITH_DEFAULTS)]
    assert loaded == [], f"imported although the config does not use them: {loaded}"
    (helper,) = server.helper_pids()
    maps = Path(f"/proc/{helper}/maps").read_text()
    assert [lib for lib in HELPER_HANDLER_LIBRARIES if lib in maps] == []
    # A ceiling with a wide margin (measured: ~41 MiB server + ~7 MiB helper; before the
    # lazy imports, ~53 + ~10): anonymous memory only, since file-backed pages are shared
    # with whatever else maps the same libraries (this test process does).
    assert server.proc is not None
    anon_mib = (pss_anon_kib(server.proc.pid) + pss_anon_kib(helper)) / 1024
    assert anon_mib < 56, f"idle server and helper: {anon_mib:.1f} MiB anonymous PSS"


def test_the_admin_page_imports_its_web_stack(make_server: MakeServer, tmp_path: Path) -> None:
    """The other side: what a config enables is imported (before the privilege drop)."""
    dump = tmp_path / "dump"
    dump.mkdir()
    server = make_server(admin={"listen": f"127.0.0.1:{free_port()}"})
    server.env["POSTILLON_MEMORY_DUMP"] = str(dump)
    server.start()
    modules = server_modules(dump)
    assert "aiohttp" in modules and "postillon.admin.server" in modules


def test_relaying_without_tls_loads_no_cryptography(
    make_server: MakeServer, sink: Callable[..., Sink], tmp_path: Path
) -> None:
    """``[outbound] tls = "none"``: no handshake, so no certificate to judge; the system CAs
    (parsed with cryptography, ~10 MiB with its shared object) are not loaded to record
    one (outbound/smtp_transport.py ``tls_checker``). Also the inbound path of a relayed
    message without signatures needs none of it."""
    dump = tmp_path / "dump"
    dump.mkdir()
    relay = sink()
    server = make_server(
        authentication={"enabled": True},
        relay={"trusted_networks": ["127.0.0.0/8"]},
        outbound={"tls": "none"},
        transport=[{"domain": "relay.test", "route": f"smtp:[127.0.0.1]:{relay.port}"}],
        # As in the bench; the first start with a self-signed certificate makes it with
        # cryptography (later starts only read it).
        tls={"self_signed": False},
    )
    server.env["POSTILLON_MEMORY_DUMP"] = str(dump)
    server.start()
    port = int(server.config["listen"][0]["address"].rpartition(":")[2])
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@relay.test", ["b@relay.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(relay.dumps(1, timeout=20)) == 1
    (dump / "modules.txt").unlink(missing_ok=True)  # the next dump: after the delivery
    modules = server_modules(dump)
    assert [m for m in modules if m.startswith(("cryptography", "nacl", "dkim"))] == []
    # The queue store's threads and libuv's workers have all allocated by now: with
    # M_ARENA_MAX = 2 (osutil/malloc.py) they share one arena instead of one each.
    assert server.proc is not None
    assert thread_arenas(server.proc.pid) <= 1
