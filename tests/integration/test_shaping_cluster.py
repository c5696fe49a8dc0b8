"""A shaping rate kept by a cluster as a whole: two postillon nodes sharing one
PostgreSQL queue send to one destination at the configured rate together, not
each at the full rate (the token bucket lives in the shared ``shaping_buckets``).

    smtplib ──► node A ─┐  PostgreSQL queue  ┌──► smtp-sink
            ──► node B ─┘  (shaping_buckets) ┘
"""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest

from support.server import ServerProcess

from .cluster_load import node_config, smtp_address

pytestmark = pytest.mark.integration

RATE_PER_MINUTE = 300  # 5 a second for the whole cluster
PER_NODE = 20


def delivered_times(node: ServerProcess) -> list[float]:
    times = []
    for line in node.maillog().splitlines():
        start = line.find("{")
        if start >= 0:
            record = json.loads(line[start:])
            if record.get("event") == "delivered":
                times.append(float(record["ts"]))
    return times


def test_two_nodes_share_one_message_rate(
    make_server: Callable[..., ServerProcess], sink: Callable[..., Any], postgres_dsn: str
) -> None:
    target = sink()
    config = node_config(postgres_dsn, target.port)
    # Two deliveries in flight per node: one node cannot claim the whole queue, so both
    # deliver (else this would only show one node keeping the rate).
    config["queue"]["concurrency"] = 2
    nodes = [
        make_server(
            **config,
            shaping=[{"match": "*", "rate": f"{RATE_PER_MINUTE}/min"}],
            log={"format": "json", "file": "mail.log"},
        )
        for _ in range(2)
    ]
    nodes[0].write_config()
    nodes[0].cli("db", "migrate")
    for node in nodes:
        node.start()
    for node in nodes:
        with smtplib.SMTP(*smtp_address(node), timeout=10) as client:
            for i in range(PER_NODE):
                body = f"From: load@example.org\r\nX-Seq: {i}\r\n\r\nshaped\r\n"
                client.sendmail("load@example.org", [f"user{i}@sink.test"], body)
    deadline = time.monotonic() + 90
    while sum(len(delivered_times(n)) for n in nodes) < 2 * PER_NODE:
        assert time.monotonic() < deadline, "not every message was delivered"
        time.sleep(0.2)
    per_node = [len(delivered_times(n)) for n in nodes]
    times = sorted(t for n in nodes for t in delivered_times(n))
    measured = (len(times) - 1) / (times[-1] - times[0])
    configured = RATE_PER_MINUTE / 60
    print(
        f"cluster rate {measured:.2f}/s for {configured:.2f}/s configured "
        f"({measured / configured:.3f}); deliveries per node {per_node}"
    )
    # Each node alone would send at the full rate: together twice as fast.
    assert measured <= configured * 1.05
    assert all(per_node)  # both nodes really delivered
