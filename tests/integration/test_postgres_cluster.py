"""Several postillon nodes sharing one queue on a real PostgreSQL server.

    smtplib load ──► node A ─┐                    ┌──► smtp-sink (counts X-Seq)
                 ──► node B ─┼── PostgreSQL queue ─┤
                 ──► node C ─┘   (leases, SKIP    └── any node delivers any message
                                  LOCKED claims)

Each test migrates a fresh database with ``postillon db migrate`` and starts real
``postillon serve`` processes on loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from support.ports import free_port
from support.postgres import PostgresServer
from support.server import ServerProcess

from .cluster_load import Load, delivered_counts, greeting, node_config, smtp_address

pytestmark = pytest.mark.integration

MakeServer = Callable[..., ServerProcess]


def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_cluster(
    make_server: MakeServer,
    dsn: str,
    sink_port: int,
    count: int,
    first_node: dict[str, Any] | None = None,
    **options: Any,
) -> list[ServerProcess]:
    """``count`` nodes on ``dsn`` (migrated first); ``first_node``: extra config for node 0."""
    nodes = [
        make_server(
            **node_config(dsn, sink_port, **options), **((first_node or {}) if i == 0 else {})
        )
        for i in range(count)
    ]
    nodes[0].write_config()
    migrated = nodes[0].cli("db", "migrate")
    assert "applied migration 1" in migrated.stdout
    return [node.start() for node in nodes]


def healthz(port: int) -> int:
    """The admin server's /healthz status code (0 if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def owner_of(node: ServerProcess) -> str:
    """The lease owner name a node's runner uses (host:pid)."""
    assert node.proc is not None
    return f"{socket.gethostname()}:{node.proc.pid}"


def test_db_cli_and_cluster_wide_queue_view(
    make_server: MakeServer, sink: Callable[..., Any], postgres_dsn: str
) -> None:
    # A sink that waits before answering DATA keeps a delivery (and its lease) in flight.
    slow = sink("-w", "30")
    node = make_server(**node_config(postgres_dsn, slow.port, lease=60.0))
    node.write_config()
    status = node.cli("db", "status", check=False)
    assert status.returncode == 1 and "run `postillon db migrate`" in status.stdout
    # A node refuses to start on an unmigrated database, naming the command.
    with pytest.raises(RuntimeError, match="postillon db migrate"):
        node.start(timeout=30)
    assert "applied migration 1" in node.cli("db", "migrate").stdout
    assert "already at version" in node.cli("db", "migrate").stdout
    assert node.cli("db", "status").returncode == 0
    node.start()
    # Another node's configuration, for its command line only: a running second node
    # could claim the message itself (whichever runner asks first gets it).
    other = make_server(**node_config(postgres_dsn, slow.port, lease=60.0))
    other.write_config()

    load = Load([node], total=1, connections=1)
    load.start()
    load.join(30)
    # The other node's CLI (same database) sees the message and who delivers it.
    wait_until(lambda: owner_of(node) in other.cli("queue", "list").stdout, 20, "the lease holder")
    (listed,) = json.loads(other.cli("queue", "list", "--json").stdout)
    assert listed["recipients"][0]["state"] == "leased"
    assert listed["recipients"][0]["lease_owner"] == owner_of(node)
    assert owner_of(node) in other.cli("queue", "show", listed["queue_id"]).stdout
    # (A graceful stop would wait for the slow sink; nothing more to check here.)
    node.kill()


def test_three_nodes_one_killed_mid_way(
    make_server: MakeServer, sink: Callable[..., Any], postgres_dsn: str
) -> None:
    total = 2000
    target = sink()
    nodes = start_cluster(make_server, postgres_dsn, target.port, 3, lease=12.0)
    victim = nodes[2]
    load = Load(nodes, total=total, connections=9, alive=lambda n: n is not victim or alive)
    alive = True
    load.start()
    load.wait_accepted(total // 2, timeout=120)

    victim.kill()  # SIGKILL: no lease handed back, sessions cut mid-transaction
    alive = False
    in_flight = query(
        postgres_dsn,
        "SELECT count(*) FROM records WHERE state = 'leased' AND lease_owner = $1",
        owner_of(victim),
    )[0][0]
    load.join(timeout=120)

    def all_delivered() -> bool:
        counts = delivered_counts(target.dump)
        left = query(postgres_dsn, "SELECT count(*) FROM records")[0][0]
        return left == 0 and load.accepted <= set(counts)

    wait_until(all_delivered, 120, "every accepted message at the sink and an empty queue")
    counts = delivered_counts(target.dump)
    duplicates = sum(n - 1 for n in counts.values())
    lost = load.accepted - set(counts)
    print(
        f"\nthree-node kill -9: sent {total}, accepted {len(load.accepted)}, "
        f"delivered {len(counts)} distinct ({sum(counts.values())} deliveries), "
        f"lost {len(lost)}, duplicates {duplicates}; at the kill: {in_flight} deliveries "
        f"leased by the killed node, {load.unacked} sessions cut before their reply; "
        f"refusals {dict(load.refused)}"
    )
    assert not lost
    assert len(load.accepted) == total
    # Duplicates only from deliveries in flight at the kill: leased by the dead
    # node, or sent by a client that never heard the 250 and sent again.
    assert duplicates <= in_flight + load.unacked
    # The survivors took over the dead node's work.
    assert all(node.proc is not None and node.proc.poll() is None for node in nodes[:2])


def test_database_restart_under_load(
    make_server: MakeServer,
    sink: Callable[..., Any],
    postgres_server: PostgresServer,
    postgres_dsn: str,
) -> None:
    total = 600
    target = sink()
    admin_port = free_port()
    nodes = start_cluster(
        make_server,
        postgres_dsn,
        target.port,
        2,
        first_node={"admin": {"listen": f"127.0.0.1:{admin_port}"}},
        lease=8.0,
    )
    assert healthz(admin_port) == 200
    load = Load(nodes, total=total, connections=4)
    load.start()
    try:
        load.wait_accepted(total // 3, timeout=60)
        postgres_server.kill()  # SIGKILL: crash recovery at the next start
        # While the database is away the nodes refuse mail: 421 4.3.0 at the greeting.
        wait_until(lambda: all(greeting(n).startswith("421 4.3.0") for n in nodes), 30, "421 4.3.0")
        # ... and a load balancer polling /healthz takes the node out (503).
        assert healthz(admin_port) == 503
    finally:
        postgres_server.start()
    wait_until(lambda: all(greeting(n).startswith("220") for n in nodes), 30, "220 again")
    assert healthz(admin_port) == 200
    load.join(timeout=120)

    def all_delivered() -> bool:
        left = query(postgres_dsn, "SELECT count(*) FROM records")[0][0]
        return left == 0 and load.accepted <= set(delivered_counts(target.dump))

    wait_until(all_delivered, 90, "every accepted message at the sink")
    counts = delivered_counts(target.dump)
    print(
        f"\ndatabase restart under load: accepted {len(load.accepted)} of {total}, "
        f"delivered {len(counts)} distinct, duplicates {sum(n - 1 for n in counts.values())}, "
        f"refusals {dict(load.refused)}, unacked {load.unacked}"
    )
    # Every 250 was a commit: everything accepted got delivered.
    assert load.accepted <= set(counts)
    assert sum(load.refused.values()) + load.unacked > 0


def test_export_from_sqlite_import_into_postgresql(
    make_server: MakeServer, sink: Callable[..., Any], postgres_dsn: str, tmp_path: Path
) -> None:
    target = sink()
    # A single node with the embedded queue, whose mail cannot leave yet (closed port).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    single = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        outbound={"tls": "none"},
        transport=[{"domain": "sink.test", "route": f"smtp:[127.0.0.1]:{dead_port}"}],
    ).start()
    load = Load([single], total=40, connections=2)
    load.start()
    load.join(60)
    held_id = json.loads(single.cli("queue", "list", "--json").stdout)[0]["queue_id"]
    single.cli("queue", "hold", held_id)
    assert single.stop(signal.SIGTERM) == 0

    export = tmp_path / "queue.jsonl"
    exported = single.cli("queue", "export", str(export))
    assert "exported 40 message(s)" in exported.stderr
    db = sqlite3.connect(single.data_dir / "queue" / "queue.db")
    assert db.execute("SELECT count(*) FROM messages").fetchone() == (40,)  # read-only
    db.close()

    cluster = make_server(**node_config(postgres_dsn, target.port))
    cluster.write_config()
    cluster.cli("db", "migrate")
    assert "imported 40 message(s); 0 already" in cluster.cli("queue", "import", str(export)).stdout
    # Run again (an interrupted import, a second operator): nothing is duplicated.
    assert "imported 0 message(s); 40 already" in cluster.cli("queue", "import", str(export)).stdout
    cluster.start()

    wait_until(lambda: len(delivered_counts(target.dump)) == 39, 60, "39 deliveries")
    (held,) = json.loads(cluster.cli("queue", "list", "--json").stdout)
    assert held["queue_id"] == held_id and held["recipients"][0]["state"] == "held"
    cluster.cli("queue", "release", held_id)
    wait_until(lambda: len(delivered_counts(target.dump)) == 40, 60, "the released one")
    counts = delivered_counts(target.dump)
    assert set(counts) == set(range(40)) and max(counts.values()) == 1


def test_large_message_streams_through_the_shared_queue(
    make_server: MakeServer, sink: Callable[..., Any], postgres_dsn: str
) -> None:
    # Over 1 MiB the body is streamed into PostgreSQL in its own transaction;
    # another node (not the one that accepted it) may deliver it from there.
    target = sink()
    accepting, _delivering = start_cluster(make_server, postgres_dsn, target.port, 2)
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    body = b"Subject: big\r\nX-Seq: 7\r\n\r\n" + line * (3 * 1024 * 1024 // len(line))
    with smtplib.SMTP(*smtp_address(accepting), timeout=60) as client:
        client.sendmail("load@example.org", ["big@sink.test"], body)
    wait_until(lambda: delivered_counts(target.dump) == {7: 1}, 60, "the big message")
    # smtp-sink writes its dump as the data arrives: wait for the last line, not the first.
    wanted = body.count(line)
    wait_until(
        lambda: target.dumps(1)[0].count("0123456789abcdefghijklmnopqrstuvwxyz" * 2) >= wanted,
        60,
        "the whole body in the dump",
    )
    (dump,) = target.dumps(1)
    assert dump.count("0123456789abcdefghijklmnopqrstuvwxyz" * 2) == wanted


def test_a_dead_nodes_leases_are_taken_over_after_node_timeout(
    make_server: MakeServer, sink: Callable[..., Any], postgres_dsn: str
) -> None:
    """Issue 18, item 12: kill -9 a node holding leases; the others deliver its
    messages after [queue] node_timeout (3 s here), long before [queue] lease
    (10 minutes) would have let them. Every delivery takes longer than the node
    timeout (the sink waits 4 s before answering DATA): a live node keeps its
    leases meanwhile, so nothing is delivered twice.

        smtplib ──► victim (claims everything, stuck in DATA) ─┐
                    node B, node C ───── PostgreSQL queue ──────┴──► slow smtp-sink
    """
    total = 6
    target = sink("-w", "4")

    def config() -> dict[str, Any]:
        options = node_config(postgres_dsn, target.port, lease=600.0)
        options["queue"]["node_timeout"] = 3.0
        return options

    victim, *others = (make_server(**config()) for _ in range(3))
    victim.write_config()
    assert "applied migration 3" in victim.cli("db", "migrate").stdout
    victim.start()
    with smtplib.SMTP(*smtp_address(victim), timeout=30) as client:
        for seq in range(total):
            body = f"Subject: takeover\r\nX-Seq: {seq}\r\n\r\nhi\r\n"
            client.sendmail("load@example.org", [f"r{seq}@sink.test"], body)

    def leased_by(node: ServerProcess) -> int:
        return int(
            query(
                postgres_dsn,
                "SELECT count(*) FROM records WHERE state = 'leased' AND lease_owner = $1",
                owner_of(node),
            )[0][0]
        )

    wait_until(lambda: leased_by(victim) == total, 30, "the victim leasing every message")
    for node in others:
        node.start()
    victim.kill()  # SIGKILL: its leases stay in the database, valid for 10 minutes
    assert leased_by(victim) == total

    wait_until(lambda: set(delivered_counts(target.dump)) == set(range(total)), 60, "takeover")
    wait_until(
        lambda: query(postgres_dsn, "SELECT count(*) FROM records")[0][0] == 0,
        60,
        "an empty queue",
    )
    counts = delivered_counts(target.dump)
    assert max(counts.values()) == 1, counts  # no live node lost its lease
    took_over = "".join(node.maillog() for node in others)
    assert "took over" in took_over
